"""QEMU's command line for a template and for a VM restored from it."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from spinbox.config import VmConfig
from spinbox.vm import Disk, Nic, QemuCommand, VmError, VmSpec, qemu
from spinbox.vm.handover import SANDBOX, Handover, NumberingHandover, VmUser
from spinbox.vm.spec import MemoryFile
from spinbox.vm.template import kernel_header, new_ram
from tests.unit.vm.conftest import BootFiles


@pytest.fixture
def spec(boot_files: BootFiles) -> VmSpec:
    return VmSpec(
        vm_id="vm1",
        kernel=boot_files.kernel,
        initrd=boot_files.initrd,
        runtime_dir=boot_files.runtime_dir,
        memory_mib=512,
        hotplug_ports=4,
    )


def argv_of(command: QemuCommand) -> list[str]:
    """The argv, its sockets and files opened into a handover closed again right after."""
    with Handover() as files:
        return command.argv(files)


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def test_a_template_writes_its_ram_into_a_shared_memfd(spec: VmSpec, tmp_path: Path) -> None:
    ram = new_ram("test-template", 1 << 20)
    try:
        spec = dataclasses.replace(spec, memory_file=MemoryFile(tmp_path / "ram", shared=True, fd=ram))
        spec.validate()
        argv = argv_of(QemuCommand(spec, accel="tcg"))
    finally:
        os.close(ram)
    assert option_values(argv, "-machine")[0].endswith(",memory-backend=mem")
    assert option_values(argv, "-object") == [
        f"memory-backend-file,id=mem,size=512M,mem-path=/proc/self/fd/{ram},share=on"
    ]
    assert "-incoming" not in argv
    # The template's kernel command line is every restored VM's.
    assert "spinbox.vm=template" in option_values(argv, "-append")[0]


def test_a_restored_vm_maps_the_ram_private_and_plugs_its_devices_later(
    spec: VmSpec, tmp_path: Path, sealed_ram: int
) -> None:
    disk = tmp_path / "upper.ext4"
    disk.write_bytes(b"")
    spec = dataclasses.replace(
        spec,
        memory_file=MemoryFile(tmp_path / "ram", shared=False, fd=sealed_ram),
        incoming_fd=40,
        disks=(Disk(disk, "upper", read_only=False),),
        nics=(Nic(tap_fd=17, mac="52:54:00:12:34:56"),),
    )
    spec.validate()
    command = QemuCommand(spec, accel="tcg")
    argv = argv_of(command)
    assert option_values(argv, "-object") == [
        f"memory-backend-file,id=mem,size=512M,mem-path=/proc/self/fd/{sealed_ram},share=off"
    ]
    assert option_values(argv, "-incoming") == ["defer"]
    # Backends only: the devices go into the spare ports once the state is loaded.
    assert [json.loads(b)["node-name"] for b in option_values(argv, "-blockdev")] == ["hp0-drive"]
    assert option_values(argv, "-netdev") == ["tap,id=net0,fd=17"]
    devices = option_values(argv, "-device")
    assert not [d for d in devices if d.startswith(("virtio-blk-pci", "virtio-net-pci"))]
    assert set(command.pass_fds) == {17, 40, sealed_ram}


def test_a_restored_vm_is_confined_like_a_cold_one(spec: VmSpec, tmp_path: Path, sealed_ram: int) -> None:
    spec = dataclasses.replace(
        spec, memory_file=MemoryFile(tmp_path / "ram", shared=False, fd=sealed_ram), incoming_fd=40
    )
    spec.validate()
    argv = argv_of(QemuCommand(spec, accel="tcg", user=VmUser(2097152000, 2097152000)))
    assert argv[argv.index("--reuid") + 1] == "2097152000"
    assert option_values(argv, "-sandbox") == [SANDBOX]


def test_a_restored_vm_refuses_ram_that_is_not_sealed(spec: VmSpec, tmp_path: Path) -> None:
    ram = new_ram("test-template", 1 << 20)
    try:
        spec = dataclasses.replace(
            spec, memory_file=MemoryFile(tmp_path / "ram", shared=False, fd=ram), incoming_fd=40
        )
        with pytest.raises(VmError, match="not a memfd sealed against writes"):
            spec.validate()
    finally:
        os.close(ram)


def test_a_confined_qemu_never_gets_its_ram_by_path(spec: VmSpec, tmp_path: Path) -> None:
    spec = dataclasses.replace(spec, memory_file=MemoryFile(tmp_path / "ram", shared=True))
    with pytest.raises(VmError, match="must be handed to a confined QEMU as a descriptor"):
        spec.validate()


def test_a_restored_vm_needs_ports_for_its_devices(spec: VmSpec, tmp_path: Path, sealed_ram: int) -> None:
    nics = tuple(Nic(tap_fd=10 + i, mac=f"52:54:00:12:34:5{i}") for i in range(5))
    spec = dataclasses.replace(
        spec, memory_file=MemoryFile(tmp_path / "ram", shared=False, fd=sealed_ram), incoming_fd=40, nics=nics
    )
    with pytest.raises(VmError, match="5 NICs do not fit in 4 spare PCIe ports"):
        spec.validate()


def test_cold_boot_keeps_qemu_s_own_memory(spec: VmSpec) -> None:
    argv = argv_of(QemuCommand(spec, accel="tcg"))
    assert "-object" not in argv
    assert "memory-backend" not in option_values(argv, "-machine")[0]


def test_a_template_s_identity_command_line_opens_nothing_and_is_stable(spec: VmSpec, tmp_path: Path) -> None:
    spec = dataclasses.replace(
        spec, runtime_dir=tmp_path / "absent", memory_file=MemoryFile(tmp_path / "ram", shared=True, fd=999)
    )
    first, second = NumberingHandover(), NumberingHandover()
    argv = QemuCommand(spec, accel="tcg").argv(first)
    assert argv == QemuCommand(spec, accel="tcg").argv(second)
    assert first.fds == [] and not (tmp_path / "absent").exists()
    assert option_values(argv, "-kernel") == ["/proc/self/fd/1000"]


def test_a_vm_with_a_share_never_has_a_templates_ram(spec: VmSpec, tmp_path: Path) -> None:
    spec = dataclasses.replace(spec, memory_file=MemoryFile(tmp_path / "ram", shared=False), virtiofs_fd=7)
    with pytest.raises(VmError, match="a VM with a virtio-fs share boots cold"):
        spec.validate()


def test_a_restored_vm_has_a_translation_cache_of_its_own_size(
    spec: VmSpec, tmp_path: Path, sealed_ram: int
) -> None:
    restored = dataclasses.replace(
        spec, memory_file=MemoryFile(tmp_path / "ram", shared=False, fd=sealed_ram), incoming_fd=40
    )
    assert option_values(argv_of(QemuCommand(restored, accel="tcg")), "-accel") == [
        f"tcg,tb-size={qemu.TCG_TB_SIZE_RESTORED_MIB}"
    ]
    assert option_values(argv_of(QemuCommand(spec, accel="tcg")), "-accel") == [
        f"tcg,tb-size={qemu.TCG_TB_SIZE_MIB}"
    ]
    assert qemu.TCG_TB_SIZE_RESTORED_MIB < qemu.TCG_TB_SIZE_MIB
    assert option_values(argv_of(QemuCommand(restored, accel="kvm")), "-accel") == ["kvm"]


def test_a_restored_vm_s_translation_cache_is_configurable(
    spec: VmSpec, tmp_path: Path, sealed_ram: int
) -> None:
    restored = dataclasses.replace(
        spec,
        memory_file=MemoryFile(tmp_path / "ram", shared=False, fd=sealed_ram),
        incoming_fd=40,
        tcg_cache_mib=64,
    )
    assert option_values(argv_of(QemuCommand(restored, accel="tcg")), "-accel") == ["tcg,tb-size=64"]
    assert option_values(argv_of(QemuCommand(restored, accel="kvm")), "-accel") == ["kvm"]
    # spinbox.toml's default is the size measured for restored VMs.
    assert VmConfig().restored_tcg_cache_mib == qemu.TCG_TB_SIZE_RESTORED_MIB


def test_a_translation_cache_beyond_qemu_s_own_default_is_refused(spec: VmSpec) -> None:
    with pytest.raises(VmError, match="TCG translation cache must be between 1 and 1024 MiB"):
        dataclasses.replace(spec, tcg_cache_mib=4096).validate()


def bzimage(path: Path, setup_sects: int, size: int) -> bytes:
    data = bytearray(size)
    data[0x1F1] = setup_sects
    data[0x202:0x206] = b"HdrS"
    data[-1] = 0xAA
    path.write_bytes(bytes(data))
    return bytes(data)


def test_a_template_keeps_the_kernel_s_boot_header_for_restored_vms(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    data = bzimage(kernel, setup_sects=39, size=1 << 20)
    assert kernel_header(kernel) == data[: 40 * 512]
    # 0 setup sectors means 4 (the boot protocol's oldest kernels).
    data = bzimage(kernel, setup_sects=0, size=1 << 16)
    assert kernel_header(kernel) == data[: 5 * 512]


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"\x7fELF" + bytes(4096), "not a bzImage"),
        (bytes(100), "too short"),
    ],
)
def test_a_kernel_that_is_no_bzimage_fails_the_template(tmp_path: Path, content: bytes, error: str) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(content)
    with pytest.raises(VmError, match=error):
        kernel_header(kernel)


def test_a_cut_bzimage_fails_the_template(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    data = bzimage(kernel, setup_sects=39, size=1 << 20)
    kernel.write_bytes(data[:4096])
    with pytest.raises(VmError, match="not a bzImage"):
        kernel_header(kernel)
