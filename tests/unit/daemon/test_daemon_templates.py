"""Which VMs spinboxd restores from a template, and when it builds one."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from spinbox.config import Config, VmConfig
from spinbox.daemon import templates as templates_module
from spinbox.daemon.options import VmRequest
from spinbox.daemon.templates import READY, TEMPLATE_PORTS, Shape, TemplateStore
from spinbox.vm.spec import SLOT_DISK_BYTES
from spinbox.vm.template import TemplateFiles


class FakeBackend:
    def __init__(self) -> None:
        self.identity: dict[str, Any] = {"initrd": 1}
        self.built: list[Shape] = []

    def template_identity(self, shape: Shape, ports: int) -> dict[str, Any]:
        return dict(self.identity)

    async def build_template(
        self, shape: Shape, ports: int, directory: Path, runtime_dir: Path, spawn: Any
    ) -> None:
        self.built.append(shape)
        (directory / "ram").write_bytes(b"")


def request(**changes: Any) -> VmRequest:
    values: dict[str, Any] = {
        "id": "vm1", "container_id": "c1", "vcpus": 1, "memory_mib": 512, "rootfs": (), "netns": "",
        "annotations": (), "kernel_args": (), "hotplug_ports": 0,
    }  # fmt: skip
    values.update(changes)
    return VmRequest(**{k: v for k, v in values.items() if k in VmRequest.__dataclass_fields__})


def store(tmp_path: Path, backend: FakeBackend, boot: str = "template") -> TemplateStore:
    config = Config(vm=VmConfig(boot=boot))
    templates = TemplateStore(config, None, backend, tmp_path)  # type: ignore[arg-type]
    templates._build_into = lambda shape, vm_id, partial: _fake_build(backend, shape, partial)  # type: ignore[method-assign]
    return templates


async def _fake_build(backend: FakeBackend, shape: Shape, partial: Path) -> None:
    os.makedirs(partial)
    await backend.build_template(shape, TEMPLATE_PORTS, partial, partial / "run", None)
    _write(partial / READY, "{}")


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def test_cold_mode_never_builds(tmp_path: Path) -> None:
    async def run() -> None:
        backend = FakeBackend()
        templates = store(tmp_path, backend, boot="cold")
        templates.start()
        assert templates.lookup(request(), 2, 1) is None
        await templates.wait_built()
        assert backend.built == []

    asyncio.run(run())


def test_a_missing_template_boots_cold_and_is_built_then_used(tmp_path: Path) -> None:
    async def run() -> None:
        backend = FakeBackend()
        templates = store(tmp_path, backend)
        assert templates.lookup(request(), 2, 1) is None
        await templates.wait_built()
        found = templates.lookup(request(), 2, 1)
        assert found is not None and found.name.startswith("1cpu-512m-")
        assert backend.built == [Shape(1, 512)]

    asyncio.run(run())


@pytest.mark.parametrize(
    ("changes", "devices"),
    [({"kernel_args": ("quiet",)}, 1), ({"hotplug_ports": 16}, TEMPLATE_PORTS - 15)],
)
def test_what_no_template_serves_boots_cold(tmp_path: Path, changes: dict[str, Any], devices: int) -> None:
    async def run() -> None:
        backend = FakeBackend()
        templates = store(tmp_path, backend)
        assert templates.lookup(request(**changes), devices, 1) is None
        await templates.wait_built()
        assert backend.built == []

    asyncio.run(run())


def test_a_changed_image_builds_a_new_template_and_removes_the_old(tmp_path: Path) -> None:
    async def run() -> None:
        backend = FakeBackend()
        templates = store(tmp_path, backend)
        templates.lookup(request(), 1, 1)
        await templates.wait_built()
        old = templates.lookup(request(), 1, 1)
        assert old is not None
        backend.identity["initrd"] = 2
        assert templates.lookup(request(), 1, 1) is None
        await templates.wait_built()
        new = templates.lookup(request(), 1, 1)
        assert new is not None and new != old
        assert not old.exists()

    asyncio.run(run())


def test_no_guest_image_yet_means_cold_boot_not_a_failed_start(tmp_path: Path) -> None:
    class NoImage(FakeBackend):
        def template_identity(self, shape: Shape, ports: int) -> dict[str, Any]:
            raise RuntimeError("no guest image at /var/lib/spinbox/guest/initrd.img")

    async def run() -> None:
        templates = store(tmp_path, NoImage())
        templates.start()
        assert templates.lookup(request(), 1, 1) is None
        await templates.wait_built()

    asyncio.run(run())


def test_a_template_replaced_while_its_ram_loads_gives_way_to_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebuild that ends while a VM's restore loads the old template's RAM: the VM restores
    from the new template, and the old RAM's copy is closed, not kept for ever."""
    loading = threading.Event()
    rebuilt = threading.Event()
    loaded: dict[str, int] = {}

    def load_ram(files: TemplateFiles) -> int:
        if not loaded:
            loading.set()
            assert rebuilt.wait(10)
        fd = os.memfd_create(files.root.name)
        loaded[files.root.name] = fd
        return fd

    monkeypatch.setattr(templates_module, "load_ram", load_ram)

    async def run() -> None:
        backend = FakeBackend()
        templates = store(tmp_path, backend)
        templates.lookup(request(), 1, 1)
        await templates.wait_built()
        old = templates.lookup(request(), 1, 1)
        assert old is not None
        restoring = asyncio.create_task(templates.for_vm(request(), [Path("/l0")], 1))
        await asyncio.to_thread(loading.wait, 10)
        backend.identity["initrd"] = 2
        assert templates.lookup(request(), 1, 1) is None
        await templates.wait_built()
        assert not old.exists()
        rebuilt.set()
        template = await restoring
        assert template is not None and template.directory != old and template.directory.exists()
        assert template.ram == loaded[template.name]
        assert not [link for link in _open_files() if link.startswith(f"/memfd:{old.name}")]
        await templates.close()

    asyncio.run(run())


def test_a_ready_templates_ram_is_loaded_before_the_first_vm_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At spinboxd's start, and once a build ends: the first VM does not wait for the copy."""
    loads: list[str] = []

    def load_ram(files: TemplateFiles) -> int:
        loads.append(files.root.name)
        return os.memfd_create(files.root.name)

    monkeypatch.setattr(templates_module, "load_ram", load_ram)

    async def run() -> None:
        backend = FakeBackend()
        built = store(tmp_path, backend)
        built.start()  # none yet: it is built, then loaded
        await built.wait_built()
        await asyncio.gather(*built._preloads)
        (name,) = loads
        template = await built.for_vm(request(), [Path("/l0")], 1)
        assert template is not None and template.name == name and loads == [name]
        await built.close()

        restarted = store(tmp_path, backend)  # a spinboxd started again finds it ready
        restarted.start()
        await asyncio.gather(*restarted._preloads)
        assert loads == [name, name]
        assert await restarted.for_vm(request(), [Path("/l0")], 1) is not None and len(loads) == 2
        await restarted.close()
        assert not [link for link in _open_files() if link.startswith(f"/memfd:{name}")]

    asyncio.run(run())


def test_a_template_whose_ram_cannot_be_loaded_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def load_ram(files: TemplateFiles) -> int:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(templates_module, "load_ram", load_ram)

    async def run() -> None:
        backend = FakeBackend()
        templates = store(tmp_path, backend)
        templates.start()
        await templates.wait_built()
        await asyncio.gather(*templates._preloads)
        # VMs boot cold, and the next lookup builds it again.
        assert templates.lookup(request(), 1, 1) is None
        await templates.wait_built()
        assert backend.built == [Shape(1, 512), Shape(1, 512)]
        await templates.close()

    asyncio.run(run())
    assert "its RAM cannot be loaded: [Errno 12] Cannot allocate memory" in caplog.text


def _open_files() -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # listdir's own descriptor
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return links


def test_a_disk_larger_than_a_slot_boots_cold(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    huge = tmp_path / "huge.erofs"
    with open(huge, "wb") as image:
        image.truncate(SLOT_DISK_BYTES + 1)  # sparse

    async def run() -> None:
        templates = store(tmp_path / "templates", FakeBackend())
        templates.lookup(request(), 1, 1)
        await templates.wait_built()
        assert await templates.for_vm(request(), [huge], 1) is None

    with caplog.at_level("INFO", logger=templates_module.__name__):
        asyncio.run(run())
    assert f"its disk {huge} is larger than a template's disk slot" in caplog.text


def test_slots_take_their_ports_whether_filled_or_not(tmp_path: Path) -> None:
    templates = store(tmp_path, FakeBackend())
    assert templates.ports_needed(0, 0) == 3
    assert templates.ports_needed(2, 1) == 3
    assert templates.ports_needed(4, 2) == 6


def test_a_vm_without_a_nic_for_the_nic_slot_boots_cold(tmp_path: Path) -> None:
    async def run() -> None:
        templates = store(tmp_path, FakeBackend())
        templates.lookup(request(), 2, 1)
        await templates.wait_built()
        assert templates.lookup(request(), 2, 1) is not None
        # Its slot's NIC would need a TAP of its own (virtio-net's offloads need one for a peer).
        assert templates.lookup(request(), 2, 0) is None

    asyncio.run(run())


def test_with_networking_off_templates_have_no_nic_slot(tmp_path: Path) -> None:
    config = Config(vm=VmConfig(boot="template"), network=(("enabled", False),))
    templates = TemplateStore(config, None, FakeBackend(), tmp_path)  # type: ignore[arg-type]
    assert templates.nic_slots == 0
    assert templates.ports_needed(2, 0) == 2
