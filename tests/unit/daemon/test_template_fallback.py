"""A VM whose template cannot serve boots cold, and the journal says why. Stub backend
and template store (failure paths); the real ones are exercised by tests/e2e/test_templates.py."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from spinbox.config import Config, TimeoutsConfig, VmConfig
from spinbox.daemon import qemu as qemu_backend
from spinbox.daemon.backend import Launch
from spinbox.daemon.errors import Failed
from spinbox.daemon.manager import VmManager
from spinbox.daemon.options import VmRequest
from spinbox.daemon.templates import Shape, Template, TemplateStore
from spinbox.vm import VmError
from tests.unit.daemon.test_create_deadline import SilentMachine, StubBackend, StubSystemd


class BrokenTemplateBackend(StubBackend):
    def __init__(self) -> None:
        super().__init__()
        self.templates: list[Any] = []

    async def launch(self, launch: Launch) -> Any:
        template = launch.template
        self.templates.append(template)
        if template is not None:
            raise Failed(
                f"restoring VM {launch.request.id} from the template {template.name} failed: no answer"
            )
        self.taken.append("qemu")
        return SilentMachine(self.taken)


class OneTemplate:
    enabled = True
    config = Config()

    def __init__(self, directory: Path, load_error: Exception | None = None) -> None:
        self.directory = directory
        self.load_error = load_error
        self.discarded: list[tuple[Path, str]] = []

    # The store's own choice between its template and a cold boot, over these stand-ins.
    for_vm = TemplateStore.for_vm

    def lookup(self, request: VmRequest, disks: int, nics: int = 0) -> Path:
        return self.directory

    async def load(self, directory: Path) -> Template:
        if self.load_error is not None:
            raise self.load_error
        return Template(directory, -1)

    def discard(self, directory: Path, error: str) -> None:
        self.discarded.append((directory, error))


@pytest.mark.parametrize("load_error", [None, VmError("cannot read the template's RAM /t/ram: gone")])
def test_a_template_that_cannot_serve_means_a_cold_boot_and_a_journal_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, load_error: Exception | None
) -> None:
    backend = BrokenTemplateBackend()
    config = Config(vm=VmConfig(boot="template"), timeouts=TimeoutsConfig(create=0.5))
    manager = VmManager(config, StubSystemd(), backend, tmp_path, storage_dir=tmp_path / "s")  # type: ignore[arg-type]
    templates = OneTemplate(tmp_path / "1cpu-256m-abc", load_error)
    manager.templates = templates  # type: ignore[assignment]
    request = VmRequest("fallback", 1, 256, (), "fallback", None, (), ())

    async def scenario() -> None:
        with pytest.raises(Failed, match="waiting for the guest's agent"):  # the stub's cold guest is silent
            await asyncio.wait_for(manager.create(request), 10)

    with caplog.at_level(logging.ERROR, logger="spinbox.daemon.manager"):
        asyncio.run(scenario())
    if load_error is None:
        assert [t is not None for t in backend.templates] == [True, False]
        assert (
            "VM fallback boots cold: restoring VM fallback from the template 1cpu-256m-abc failed"
            in caplog.text
        )
    else:
        assert backend.templates == [None]
        assert "VM fallback boots cold: the template 1cpu-256m-abc cannot serve: cannot read" in caplog.text
    assert [d for d, _ in templates.discarded] == [templates.directory]
    assert backend.taken == []


def test_a_restored_vm_whose_agent_does_not_answer_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # template.restore kills a VM whose agent does not answer Refresh; the backend names it so
    # that the VM boots cold instead.
    async def restore(spec: Any, files: Any, ram: int, spawn: Any) -> Any:
        raise VmError("VM unready's agent did not answer Refresh within 30 s")

    monkeypatch.setattr(qemu_backend.template, "restore", restore)
    backend = qemu_backend.QemuBackend(Config(vm=VmConfig(accel="tcg")))
    monkeypatch.setattr(backend, "_kernel", lambda: tmp_path / "vmlinuz")
    monkeypatch.setattr(backend, "_initrd", lambda: tmp_path / "initrd.img")
    request = VmRequest("unready", 1, 256, (), "unready", None, (), ())
    ready = Template(tmp_path / "1cpu-256m-abc", -1)
    launch = Launch(request, tmp_path / "run", [], [], None)  # type: ignore[arg-type]
    with pytest.raises(
        Failed, match="from the template 1cpu-256m-abc failed: VM unready's agent did not answer Refresh"
    ):
        asyncio.run(backend._restore(launch, ready))


def test_a_restored_vm_gets_the_configured_translation_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs: list[Any] = []

    async def restore(spec: Any, files: Any, ram: int, spawn: Any) -> Any:
        specs.append(spec)
        raise VmError("VM sized's agent did not answer Refresh within 30 s")

    monkeypatch.setattr(qemu_backend.template, "restore", restore)
    backend = qemu_backend.QemuBackend(Config(vm=VmConfig(accel="tcg", restored_tcg_cache_mib=64)))
    monkeypatch.setattr(backend, "_kernel", lambda: tmp_path / "vmlinuz")
    monkeypatch.setattr(backend, "_initrd", lambda: tmp_path / "initrd.img")
    request = VmRequest("sized", 1, 256, (), "sized", None, (), ())
    launch = Launch(request, tmp_path / "run", [], [], None)  # type: ignore[arg-type]
    with pytest.raises(Failed):
        asyncio.run(backend._restore(launch, Template(tmp_path / "1cpu-256m-abc", -1)))
    assert [spec.tcg_cache_mib for spec in specs] == [64]


@pytest.mark.parametrize(("network", "nic_slots"), [({}, 1), ({"enabled": False}, 0)])
def test_a_template_s_slots_come_from_the_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, network: dict[str, Any], nic_slots: int
) -> None:
    config = Config(vm=VmConfig(accel="tcg", template_disk_slots=3), network=tuple(network.items()))
    backend = qemu_backend.QemuBackend(config)
    monkeypatch.setattr(backend, "_kernel", lambda: tmp_path / "vmlinuz")
    monkeypatch.setattr(backend, "_initrd", lambda: tmp_path / "initrd.img")
    spec = backend._template_spec("t", tmp_path, 1, 512, 24)
    # With networking off no VM has a NIC, and none waits in the template.
    assert (spec.disk_slots, spec.nic_slots) == (3, nic_slots)


def test_a_template_s_identity_covers_its_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd.img").write_bytes(b"i")

    def identity(**slots: int) -> dict[str, Any]:
        backend = qemu_backend.QemuBackend(Config(vm=VmConfig(accel="tcg", **slots)))
        monkeypatch.setattr(backend, "_kernel", lambda: tmp_path / "vmlinuz")
        monkeypatch.setattr(backend, "_initrd", lambda: tmp_path / "initrd.img")
        return backend.template_identity(Shape(1, 512), 24)

    default = identity()
    assert default == identity()
    assert "virtio-net-pci,id=nic0,netdev=net0,mac=02:53:42:00:00:00,bus=hp2" in default["argv"]
    assert identity(template_disk_slots=1) != default
    assert identity(template_nic_slots=0) != default
