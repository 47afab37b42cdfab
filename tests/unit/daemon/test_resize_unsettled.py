"""A resize whose guest does not count the machine's new size in time: Failed, and the VM's
scope and record follow the machine (its memory is plugged or gone either way)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from spinbox.daemon import guestrecord, resize
from spinbox.daemon.errors import Failed, GuestUnsettled
from spinbox.daemon.systemd import ScopeLimits

OVERHEAD = 64


class FakeState:
    scope = "spinbox-vm-unsettled1.scope"

    def __init__(self) -> None:
        self.resources: dict[str, Any] = {"vcpus": 1, "memory-mib": 768}
        self.saved = 0

    def save(self, runtime_dir: Path) -> None:
        self.saved += 1


class FakeBackend:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def size_range(self, machine: object) -> tuple[tuple[int, int], tuple[int, int]]:
        return (1, 256), (3, 1024)

    async def resize(self, machine: object, vcpus: int, memory_mib: int) -> dict[str, int]:
        raise self.error


class FakeSystemd:
    def __init__(self) -> None:
        self.limits: list[ScopeLimits] = []

    async def set_limits(self, scope: str, limits: ScopeLimits) -> None:
        self.limits.append(limits)


def run(error: BaseException, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, BaseException, list[Any]]:
    recorded: list[BaseException] = []
    monkeypatch.setattr(guestrecord, "record_if_missed", lambda vm, e: recorded.append(e))
    manager = SimpleNamespace(
        config=SimpleNamespace(vm=SimpleNamespace(memory_overhead_mib=OVERHEAD)),
        backend=FakeBackend(error),
        systemd=FakeSystemd(),
        publisher=None,
    )

    async def scenario() -> Any:
        vm = SimpleNamespace(
            id="unsettled1",
            lock=asyncio.Lock(),
            phase="running",
            state=FakeState(),
            runtime_dir=Path("/nonexistent"),
            machine=object(),
        )
        with pytest.raises(Failed) as raised:
            await resize.resize(manager, vm, 1, 256)  # type: ignore[arg-type]
        return vm, raised.value

    vm, raised = asyncio.run(scenario())
    return manager, vm, raised, recorded


def test_the_scope_and_record_follow_a_machine_whose_guest_did_not_settle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    error = GuestUnsettled("VM unsettled1's guest did not count ...", {"vcpus": 3, "memory-mib": 256})
    manager, vm, raised, recorded = run(error, monkeypatch)
    assert raised is error
    assert recorded == [error]  # the guest's state is recorded in the VM's journal
    wide, new = manager.systemd.limits
    assert wide == ScopeLimits.for_vm(1, 768, OVERHEAD)
    assert new == ScopeLimits.for_vm(1, 256, OVERHEAD)
    assert vm.state.resources["memory-mib"] == 256
    assert vm.state.resources["plugged-vcpus"] == 3
    assert vm.state.resources["memory-max"] == new.memory_max
    assert vm.state.saved == 1


def test_a_guest_that_refused_leaves_the_scope_and_record_as_they_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    error = Failed("VM unsettled1's guest could not give back 512 MiB of memory in time")
    manager, vm, raised, _ = run(error, monkeypatch)
    assert raised is error
    assert manager.systemd.limits[-1] == ScopeLimits.for_vm(1, 768, OVERHEAD)
    assert vm.state.resources == {"vcpus": 1, "memory-mib": 768}
    assert vm.state.saved == 0
