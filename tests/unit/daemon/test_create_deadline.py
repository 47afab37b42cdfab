"""A VM creation has one deadline (timeouts.create): a guest that never
answers makes CreateVM fail with a sentence naming the VM and the step, and
everything the creation took (QEMU, network, scope, runtime directory) is
given back. Stub backend; the real one is exercised by the e2e tests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from spinbox.config import Config, TimeoutsConfig
from spinbox.daemon.backend import Launch
from spinbox.daemon.errors import Failed, NotFound
from spinbox.daemon.manager import VmManager
from spinbox.daemon.options import VmRequest


class SilentMachine:
    """QEMU started, but the guest's agent never answers."""

    pid = 0
    agent_address = "unix:/nonexistent/agent"
    control_address = "unix:/nonexistent/control"
    console_socket = None
    log_socket = None
    timeline: dict[str, float] = {}

    def __init__(self, taken: list[str]) -> None:
        self.taken = taken

    async def wait_ready(self, timeout: float) -> Any:  # noqa: ASYNC109
        await asyncio.sleep(3600)

    async def kill(self) -> None:
        self.taken.remove("qemu")


class StubNetwork:
    guest = None

    def close(self) -> None:
        pass


class StubBackend:
    def __init__(self) -> None:
        self.taken: list[str] = []
        self.launched = asyncio.Event()

    def accelerator(self) -> str:
        return "tcg"

    async def setup_network(self, request: VmRequest) -> tuple[StubNetwork, list[Any]]:
        self.taken.append("network")
        return StubNetwork(), []

    async def teardown_network(self, vm_id: str) -> None:
        if "network" in self.taken:
            self.taken.remove("network")

    async def launch(self, launch: Launch) -> Any:
        self.taken.append("qemu")
        self.launched.set()
        return SilentMachine(self.taken)


class StubSystemd:
    def __init__(self) -> None:
        self.waited: list[str] = []

    async def stop_unit(self, name: str) -> None:
        pass

    async def wait_gone(self, name: str) -> None:
        self.waited.append(name)


def test_a_guest_that_never_answers_fails_the_create_within_its_deadline(tmp_path: Path) -> None:
    backend = StubBackend()
    systemd = StubSystemd()
    config = Config(timeouts=TimeoutsConfig(create=0.5))
    manager = VmManager(config, systemd, backend, tmp_path, storage_dir=tmp_path / "storage")  # type: ignore[arg-type]
    request = VmRequest("silent", 1, 256, (), "silent", None, (), ())

    async def scenario() -> None:
        with pytest.raises(Failed) as raised:
            await asyncio.wait_for(manager.create(request), 10)
        assert str(raised.value).startswith(
            "VM 'silent' was not created within 0.5s (timeouts.create): "
            "waiting for the guest's agent did not finish; what the VM had taken was given back"
        )
        assert "journalctl -u spinbox-vm-silent.scope" in str(raised.value)

    asyncio.run(scenario())
    assert backend.taken == []
    assert systemd.waited == ["spinbox-vm-silent.scope"]
    assert manager.vms == {}
    assert list((tmp_path / "vm").glob("*")) == []
    # The id is free again: a second create is not refused as a duplicate.
    assert "silent" not in manager._reserved


def test_getvm_of_a_vm_being_created_answers_once_the_creation_ended(tmp_path: Path) -> None:
    backend = StubBackend()
    config = Config(timeouts=TimeoutsConfig(create=1.0))
    manager = VmManager(config, StubSystemd(), backend, tmp_path, storage_dir=tmp_path / "s")  # type: ignore[arg-type]
    request = VmRequest("late", 1, 256, (), "late", None, (), ())

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        create = asyncio.create_task(manager.create(request))
        await asyncio.wait_for(backend.launched.wait(), 10)
        asked = loop.time()
        # Not "no such VM" while spinboxd still holds it: the answer waits.
        with pytest.raises(NotFound):
            await asyncio.wait_for(manager.settled("late"), 10)
        with pytest.raises(Failed):
            await create
        return loop.time() - asked

    waited = asyncio.run(scenario())
    assert waited > 0.3
    assert backend.taken == []
