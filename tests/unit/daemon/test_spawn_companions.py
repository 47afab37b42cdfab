"""A companion's prefix runs before its waiting shell, and its `started` hook is awaited before the
VM's scope is asked for; a hook that fails undoes the spawn (systemd faked: failure paths)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any, cast

import pytest

from spinbox.daemon.errors import Failed
from spinbox.daemon.spawn import ScopeSpawner
from spinbox.daemon.systemd import ScopeLimits, SystemdManager


class FakeSystemd:
    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.scope_pids: list[int] = []

    async def start_scope(self, name: str, pid: int, *args: Any, extra_pids: list[int]) -> None:
        self.events.append("scope")
        self.scope_pids = [pid, *extra_pids]

    async def stop_unit(self, name: str) -> None:
        self.events.append("stop")

    async def wait_gone(self, name: str) -> None:
        pass


def spawner(tmp_path: Path, events: list[str]) -> ScopeSpawner:
    systemd = cast(SystemdManager, FakeSystemd(events))
    return ScopeSpawner(systemd, "t1", tmp_path, ScopeLimits(1 << 30, 1_000_000, 64), "test")


def written(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.02)


def test_the_prefix_runs_first_and_the_hook_before_the_scope(tmp_path: Path) -> None:
    events: list[str] = []
    spawn = spawner(tmp_path, events)
    out = tmp_path / "out"
    fd = os.open(os.devnull, os.O_RDONLY)

    async def started(process: subprocess.Popen[bytes]) -> None:
        assert process.poll() is None
        events.append("started")

    spawn.add_companion(
        ["sh", "-c", f'echo "$SPINBOX_PREFIXED" > {out}; exec sleep 30'],
        (fd,),
        prefix=["env", "SPINBOX_PREFIXED=yes"],
        started=started,
    )

    async def main() -> None:
        process = await spawn(["sleep", "30"])
        try:
            await asyncio.to_thread(written, out)
        finally:
            await spawn.abort()
        assert process.process.poll() is not None

    asyncio.run(main())
    assert events == ["started", "scope", "stop"]
    assert out.read_text() == "yes\n"
    with pytest.raises(OSError):
        os.fstat(fd)  # the spawner closed the companion's descriptor


def test_a_failing_hook_undoes_the_spawn(tmp_path: Path) -> None:
    events: list[str] = []
    spawn = spawner(tmp_path, events)
    fd = os.open(os.devnull, os.O_RDONLY)
    seen: list[subprocess.Popen[bytes]] = []

    async def started(process: subprocess.Popen[bytes]) -> None:
        seen.append(process)
        raise Failed("no namespace")

    spawn.add_companion(["sleep", "30"], (fd,), started=started)
    with pytest.raises(Failed, match="no namespace"):
        asyncio.run(spawn(["sleep", "30"]))
    assert events == []  # no scope was asked for
    assert seen and seen[0].poll() is not None  # the companion is gone
    assert spawn.process is None
    with pytest.raises(OSError):
        os.fstat(fd)
