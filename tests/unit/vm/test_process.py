"""Watching QEMU's process whoever started it, and telling a pid from its reuse."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from spinbox.procstat import start_time
from spinbox.vm.errors import VmError, VmNotRunning
from spinbox.vm.machine import VmState
from spinbox.vm.process import PidProcess, as_handle


def test_a_pid_is_watched_through_a_pidfd() -> None:
    child = subprocess.Popen(["sh", "-c", "read x; exit 7"], stdin=subprocess.PIPE)

    async def scenario() -> None:
        handle = as_handle(child.pid)
        assert child.stdin is not None
        child.stdin.close()
        assert isinstance(handle, PidProcess)
        assert await asyncio.wait_for(handle.wait(), 30) == 7
        assert await handle.wait() == 7  # waiting twice gives the same answer

    asyncio.run(scenario())


def test_start_time_tells_a_live_process() -> None:
    assert start_time(os.getpid()) == start_time(os.getpid())
    assert start_time(2**22 + 1) is None  # above pid_max: never a process


def test_state_round_trip(tmp_path: Path) -> None:
    state = VmState(
        vm_id="a",
        pid=1,
        start_time=2,
        accel="tcg",
        agent_address="unix:/x",
        control_address="unix:/y",
        stamps={"exec": 1.5},
        guest={"entry": 10},
    )
    state.save(tmp_path / "vm.json")
    assert VmState.load(tmp_path / "vm.json") == state


def test_state_errors(tmp_path: Path) -> None:
    with pytest.raises(VmNotRunning, match="no VM state"):
        VmState.load(tmp_path / "vm.json")
    (tmp_path / "vm.json").write_text("{")
    with pytest.raises(VmError, match="is not readable"):
        VmState.load(tmp_path / "vm.json")
