"""A template's device slots: the disks and NICs it boots with, and how a restored VM fills them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from guest.vminitd import network as guest_network
from spinbox.vm import Disk, Nic, QemuCommand, VmError, VmSpec, qemu
from spinbox.vm.handover import Handover
from spinbox.vm.spec import SLOT_DISK_BYTES, MemoryFile
from spinbox.vm.template import _plug_devices
from tests.unit.vm.conftest import BootFiles


@pytest.fixture
def template(tmp_path: Path, boot_files: BootFiles) -> VmSpec:
    return VmSpec(
        vm_id="template-1",
        kernel=boot_files.kernel,
        initrd=boot_files.initrd,
        runtime_dir=boot_files.runtime_dir,
        memory_mib=512,
        hotplug_ports=8,
        disk_slots=2,
        nic_slots=1,
        memory_file=MemoryFile(tmp_path / "ram", shared=True, fd=999),
        # The slot's NIC has a TAP for a peer, alone in a namespace (spinbox.net.open_unconnected_taps).
        nics=(Nic(tap_fd=30, mac=qemu.SLOT_MAC),),
    )


def restored(template: VmSpec, tmp_path: Path, ram: int, disks: int, nics: int) -> VmSpec:
    paths = [tmp_path / f"disk{i}" for i in range(disks)]
    for path in paths:
        path.write_bytes(b"")
    return dataclasses.replace(
        template,
        vm_id="vm1",
        memory_file=MemoryFile(tmp_path / "ram", shared=False, fd=ram),
        incoming_fd=40,
        disks=tuple(Disk(path, f"sb-l{i}", read_only=i == 0) for i, path in enumerate(paths)),
        nics=tuple(Nic(tap_fd=17 + i, mac=f"52:54:00:12:34:5{i}") for i in range(nics)),
    )


def argv_of(spec: VmSpec) -> list[str]:
    spec.validate()
    with Handover() as files:
        return QemuCommand(spec, accel="tcg").argv(files)


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def devices(argv: list[str]) -> list[dict[str, str]]:
    """The virtio-blk and virtio-net devices, as their options."""
    found = []
    for device in option_values(argv, "-device"):
        driver, _, rest = device.partition(",")
        if driver in ("virtio-blk-pci", "virtio-net-pci"):
            found.append({"driver": driver, **dict(option.split("=", 1) for option in rest.split(","))})
    return found


def shape(found: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    """What QEMU's migration matches a device by: its kind, its id and where it sits."""
    return [(d["driver"], d["id"], d["bus"]) for d in found]


def test_a_template_boots_with_placeholders_in_its_slots(template: VmSpec) -> None:
    argv = argv_of(template)
    assert devices(argv) == [
        {"driver": "virtio-blk-pci", "id": "hp0-blk", "drive": "hp0-drive", "serial": "~slot0", "bus": "hp0"},
        {"driver": "virtio-blk-pci", "id": "hp1-blk", "drive": "hp1-drive", "serial": "~slot1", "bus": "hp1"},
        {"driver": "virtio-net-pci", "id": "nic0", "netdev": "net0", "mac": qemu.SLOT_MAC, "bus": "hp2"},
    ]
    placeholders = [json.loads(b) for b in option_values(argv, "-blockdev")]
    assert placeholders == [
        {"driver": "null-co", "node-name": f"hp{i}-drive", "size": SLOT_DISK_BYTES, "read-zeroes": True}
        for i in range(2)
    ]
    assert option_values(argv, "-netdev") == ["tap,id=net0,fd=30"]


def test_a_restored_vm_fills_the_template_s_slots_with_its_own_disks_and_nic(
    template: VmSpec, tmp_path: Path, sealed_ram: int
) -> None:
    spec = restored(template, tmp_path, sealed_ram, disks=1, nics=1)
    argv = argv_of(spec)
    found = devices(argv)
    # The same devices at the same places as the template's: the migration loads into them.
    assert shape(found) == shape(devices(argv_of(template)))
    assert found[0]["serial"] == "sb-l0" and found[1]["serial"] == "~slot1"
    assert found[2]["netdev"] == "net0" and found[2]["mac"] == "52:54:00:12:34:50"
    backends = {b["node-name"]: b for b in map(json.loads, option_values(argv, "-blockdev"))}
    assert backends["hp0-drive"]["driver"] == "raw"
    assert backends["hp0-drive"]["file"]["filename"] == f"/dev/fdset/{qemu.HOTPLUG_FDSET_BASE}"
    assert backends["hp1-drive"]["driver"] == "null-co"
    assert option_values(argv, "-netdev") == ["tap,id=net0,fd=17"]


def test_a_restored_vm_without_disks_keeps_every_disk_placeholder(
    template: VmSpec, tmp_path: Path, sealed_ram: int
) -> None:
    argv = argv_of(restored(template, tmp_path, sealed_ram, disks=0, nics=1))
    assert [d.get("serial") for d in devices(argv)] == ["~slot0", "~slot1", None]
    assert shape(devices(argv)) == shape(devices(argv_of(template)))


def test_every_nic_slot_needs_a_nic(template: VmSpec, tmp_path: Path, sealed_ram: int) -> None:
    spec = restored(template, tmp_path, sealed_ram, disks=1, nics=0)
    with pytest.raises(VmError, match="1 NIC slots need as many NICs, not 0"):
        spec.validate()


def test_devices_beyond_the_slots_go_into_the_ports_after_them(
    template: VmSpec, tmp_path: Path, sealed_ram: int
) -> None:
    spec = restored(template, tmp_path, sealed_ram, disks=3, nics=2)
    assert qemu.port_layout(spec) == qemu.PortLayout(disks=(0, 1, 3), nics=(2, 4))
    argv = argv_of(spec)
    # Their backends are named for their ports; the devices are plugged after the restore.
    nodes = [json.loads(b)["node-name"] for b in option_values(argv, "-blockdev")]
    assert nodes == ["hp0-drive", "hp1-drive", "hp3-drive"]
    assert option_values(argv, "-netdev") == ["tap,id=net0,fd=17", "tap,id=net1,fd=18"]
    assert shape(devices(argv)) == shape(devices(argv_of(template)))


def test_without_slots_every_device_is_plugged_disks_first(
    template: VmSpec, tmp_path: Path, sealed_ram: int
) -> None:
    spec = dataclasses.replace(
        restored(template, tmp_path, sealed_ram, disks=2, nics=2), disk_slots=0, nic_slots=0
    )
    assert qemu.port_layout(spec) == qemu.PortLayout(disks=(0, 1), nics=(2, 3))
    assert devices(argv_of(spec)) == []


def test_slots_and_further_devices_must_fit_in_the_ports(
    template: VmSpec, tmp_path: Path, sealed_ram: int
) -> None:
    spec = dataclasses.replace(restored(template, tmp_path, sealed_ram, disks=4, nics=4), hotplug_ports=6)
    with pytest.raises(VmError, match="2 disk and 1 NIC slots and 5 further devices do not fit in 6"):
        spec.validate()


class FakeVm:
    def __init__(self) -> None:
        self.added: list[dict[str, Any]] = []
        self.plugged: dict[str, str] = {}

    async def execute(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        assert command == "device_add"
        self.added.append(arguments)
        return {}

    def mark_plugged(self, port: str, name: str) -> None:
        self.plugged[port] = name


def test_only_devices_beyond_the_slots_are_hot_plugged(
    template: VmSpec, tmp_path: Path, sealed_ram: int
) -> None:
    spec = restored(template, tmp_path, sealed_ram, disks=3, nics=1)
    vm = FakeVm()
    asyncio.run(_plug_devices(vm, spec))  # type: ignore[arg-type]
    assert [(a["driver"], a["bus"], a.get("serial")) for a in vm.added] == [
        ("virtio-blk-pci", "hp3", "sb-l2")
    ]
    # Every slot is a port in use: a pod's further disks go elsewhere, its own can be unplugged.
    assert vm.plugged == {"hp0": "sb-l0", "hp1": "sb-l1", "hp2": "nic:52:54:00:12:34:50", "hp3": "sb-l2"}


def test_the_guest_knows_the_nic_slots_mac() -> None:
    assert guest_network.SLOT_MAC == qemu.SLOT_MAC


def test_a_disk_larger_than_a_slot_is_refused_there(
    template: VmSpec, tmp_path: Path, sealed_ram: int
) -> None:
    spec = restored(template, tmp_path, sealed_ram, disks=3, nics=1)
    with open(spec.disks[2].path, "wb") as image:
        image.truncate(SLOT_DISK_BYTES + 1)  # sparse; beyond the slots, it is hot-plugged
    spec.validate()
    with open(spec.disks[1].path, "wb") as image:
        image.truncate(SLOT_DISK_BYTES + 1)
    with pytest.raises(VmError, match=r"disk1 .* is larger than a template's disk slot"):
        spec.validate()
