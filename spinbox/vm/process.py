"""QEMU's process: how it is spawned, watched and reaped, whoever started it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

log = logging.getLogger("spinbox.vm.qemu")


class ProcessHandle(Protocol):
    """What spinbox.vm needs of a started QEMU: its pid and a way to await its exit."""

    @property
    def pid(self) -> int: ...

    async def wait(self) -> int | None: ...


# A spawn starts argv with exactly `pass_fds` inherited and returns the process
# (or just its pid, which is then watched through a pidfd).
Spawn = Callable[[list[str], Sequence[int]], Awaitable["ProcessHandle | int"]]


class QemuChild:
    """A QEMU started by spawn_subprocess: its stderr goes to the log, the last lines kept for errors."""

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        self._reader = asyncio.ensure_future(self._read_stderr(name))

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait(self) -> int | None:
        status = await self.process.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(2):
                await asyncio.shield(self._reader)
        return status

    async def _read_stderr(self, name: str) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.tail.append(line)
                log.warning("%s: %s", name, line)


async def spawn_subprocess(argv: list[str], pass_fds: Sequence[int]) -> QemuChild:
    """The default spawn: a child process in its own session, stderr captured."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
        )
    except FileNotFoundError as error:
        from spinbox.vm.errors import VmError

        raise VmError(f"{argv[0]} is not installed: apt install qemu-system-x86") from error
    # A confined QEMU is started through unshare and setpriv (spinbox.vm.handover): name it by
    # the program they run, after their last "--".
    wrapped = Path(argv[0]).name in ("unshare", "setpriv") and "--" in argv
    program = argv[len(argv) - argv[::-1].index("--")] if wrapped else argv[0]
    return QemuChild(process, Path(program).name)


class PidProcess:
    """A process known only by pid (spawned elsewhere, or re-adopted): watched through a pidfd."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._fd = os.pidfd_open(pid)
        self._done: asyncio.Future[int | None] | None = None

    @property
    def pid(self) -> int:
        return self._pid

    async def wait(self) -> int | None:
        if self._done is None:
            self._done = asyncio.ensure_future(self._wait())
        return await asyncio.shield(self._done)

    async def _wait(self) -> int | None:
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(self._fd, on_readable)
        try:
            await readable
        finally:
            loop.remove_reader(self._fd)
            os.close(self._fd)
        return reap(self._pid)


def reap(pid: int) -> int | None:
    """The exit status of an exited child; None if it is not our child (its parent reaps it)."""
    try:
        found, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if found else None


def as_handle(started: ProcessHandle | int) -> ProcessHandle:
    return PidProcess(started) if isinstance(started, int) else started


def send_signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
