"""What a previous spinboxd left dead is cleaned up after spinboxd serves again (its writebacks
boot helper VMs): meanwhile the VM's id is refused to CreateVM by name, GetVM answers once it
is gone, and its network is left to its own cleanup (fakes; the real path with a helper VM is in
tests/integration/daemon/test_spinboxd_writeback.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from spinbox.config import Config
from spinbox.daemon import leftover
from spinbox.daemon.errors import AlreadyExists, NotFound
from spinbox.daemon.manager import VmManager
from spinbox.daemon.options import VmRequest
from spinbox.daemon.state import VmState


class FakeBackend:
    def __init__(self) -> None:
        self.known: list[str] = []
        self.collected = False

    async def collect_network_leftovers(self, live_vm_ids: Sequence[str]) -> None:
        self.known = list(live_vm_ids)

    async def collect_storage_leftovers(self) -> None:
        self.collected = True


class FakeSystemd:
    async def scope_of_pid(self, pid: int) -> str:
        return ""


def test_a_leftover_is_cleaned_up_in_the_background_and_its_id_refused_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "run" / "vm" / "vm1"
    directory.mkdir(parents=True)
    VmState(id="vm1", phase="running", scope="spinbox-vm-vm1.scope", pid=0).save(directory)
    writeback = asyncio.Event()
    removed: list[str] = []

    async def remove_leftover(manager: Any, vm_id: str, state: Any, where: Path) -> None:
        await writeback.wait()  # a helper VM reading the layer
        removed.append(vm_id)

    monkeypatch.setattr(leftover, "remove_leftover", remove_leftover)
    backend = FakeBackend()
    manager = VmManager(Config(), FakeSystemd(), backend, tmp_path / "run", tmp_path / "vms")  # type: ignore[arg-type]
    request = VmRequest("vm1", 1, 256, (), "c1", None, (), ())

    async def run() -> None:
        await manager.recover()  # before the bus name: quick
        assert backend.known == ["vm1"]  # its network is its cleanup's, not collected
        assert manager.endings.get("vm1") is not None  # its shim may ask how it ended
        cleanup = manager.start_cleanup()
        with pytest.raises(
            AlreadyExists, match="VM 'vm1' was left by a previous spinboxd and is being cleaned up"
        ):
            await manager.create(request)
        with pytest.raises(AlreadyExists, match="being cleaned up"):
            await manager.prepare_netns("vm1")
        answer = asyncio.create_task(manager.settled("vm1"))
        await asyncio.sleep(0.05)
        assert not answer.done() and removed == []
        writeback.set()
        with pytest.raises(NotFound):
            await answer
        await cleanup
        assert removed == ["vm1"] and manager.recovering == {} and backend.collected

    asyncio.run(run())


def test_a_cleanup_cut_short_by_a_stop_leaves_its_waiters_unanswered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GetVM answered "no VM" would let the shim drop a container whose layer is not back yet:
    it gets no answer from a stopping spinboxd (the bus then tells it spinboxd went away)."""
    directory = tmp_path / "run" / "vm" / "vm1"
    directory.mkdir(parents=True)
    VmState(id="vm1", phase="stopping", scope="spinbox-vm-vm1.scope").save(directory)

    async def remove_leftover(manager: Any, vm_id: str, state: Any, where: Path) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(leftover, "remove_leftover", remove_leftover)
    manager = VmManager(Config(), FakeSystemd(), FakeBackend(), tmp_path / "run", tmp_path / "vms")  # type: ignore[arg-type]

    async def run() -> None:
        await manager.recover()
        manager.start_cleanup()
        answer = asyncio.create_task(manager.settled("vm1"))
        await asyncio.sleep(0.01)
        await manager.abandon_cleanup()
        await asyncio.sleep(0.01)
        assert not answer.done()
        assert "vm1" in manager.recovering
        answer.cancel()

    asyncio.run(run())
