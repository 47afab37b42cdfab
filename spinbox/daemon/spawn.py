"""Starting QEMU inside its own transient scope, never outside it.

The child is started as a tiny shell that blocks reading a pipe. Meanwhile
spinboxd asks systemd for `spinbox-vm-<id>.scope` holding the child's pid;
once systemd has started the scope, spinboxd writes a line into the pipe and
the shell execs QEMU (same pid, now in the scope). If the scope cannot be
made, the pipe is closed unwritten and the shell exits without running QEMU.

QEMU's stderr (and stdout) is a FIFO in the VM's runtime directory that the
child holds open read-write: QEMU can always write to it, even while
spinboxd restarts, and spinboxd (re)opens the read end to pass its lines to
the journal. Lines written while nobody reads wait in the pipe's buffer.

Companions (the VM's virtiofsd) are started the same way before QEMU and
join the same scope, so their memory and CPU count against the VM. A
companion's `prefix` runs before its waiting shell (virtiofsd's user
namespace is made there), and its `started` hook is awaited before the scope
is asked for (spinboxd writes that namespace's maps then).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from spinbox.daemon.process import wait_pid_exit
from spinbox.daemon.systemd import ScopeLimits, SystemdManager, scope_name

# $0 is a label for ps; stdin is the go-ahead pipe (a shell redirects only
# single-digit fds). `read` fails at EOF, i.e. when spinboxd closes the pipe
# without a go-ahead. QEMU then gets /dev/null as stdin.
_WAIT_THEN_EXEC = 'read -r go || exit 97; exec </dev/null; exec "$@"'

QEMU_LOG_FIFO = "qemu.log"


# Awaited with a started companion: returns once it is ready for QEMU, raises if it never is.
Ready = Callable[[subprocess.Popen[bytes]], Awaitable[None]]


@dataclass(frozen=True)
class Companion:
    argv: list[str]
    fds: tuple[int, ...]
    ready: Ready | None = None
    prefix: tuple[str, ...] = ()
    started: Ready | None = None


class SpawnError(RuntimeError):
    pass


class ScopedProcess:
    """QEMU as spinboxd's child (spinbox.vm's ProcessHandle): its pid, and its exit, reaped."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait(self) -> int | None:
        await wait_pid_exit(self.process.pid, self.process)
        return self.process.returncode


def qemu_log_fifo(runtime_dir: Path) -> Path:
    return runtime_dir / QEMU_LOG_FIFO


def make_fifo(path: Path) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkfifo(path, 0o600)


class ScopeSpawner:
    """spawn(argv, pass_fds) for spinbox.vm.launch: QEMU in `spinbox-vm-<id>.scope`."""

    def __init__(
        self,
        systemd: SystemdManager,
        vm_id: str,
        runtime_dir: Path,
        limits: ScopeLimits,
        description: str,
    ) -> None:
        self.systemd = systemd
        self.vm_id = vm_id
        self.runtime_dir = runtime_dir
        self.limits = limits
        self.description = description
        self.scope = scope_name(vm_id)
        self.process: subprocess.Popen[bytes] | None = None
        self.scope_started = False
        # Processes that start with QEMU in its scope.
        self.companions: list[Companion] = []
        self.companion_processes: list[subprocess.Popen[bytes]] = []
        self.reapers: list[asyncio.Task[None]] = []

    def add_companion(
        self,
        argv: list[str],
        fds: tuple[int, ...],
        ready: Ready | None = None,
        *,
        prefix: Sequence[str] = (),
        started: Ready | None = None,
    ) -> None:
        """A process to start with QEMU in its scope, inheriting `fds`, which the spawner owns and
        closes once the process has them (or the spawn is undone). `prefix` runs first (until its
        go-ahead), `started` is awaited before the scope is made, and QEMU starts once `ready`
        (given the running companion) has returned."""
        self.companions.append(Companion(argv, fds, ready, tuple(prefix), started))

    def _close_companion_fds(self) -> None:
        for companion in self.companions:
            for fd in companion.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.companions = []

    def _waiting(
        self, argv: list[str], pass_fds: Sequence[int], label: str, prefix: Sequence[str] = ()
    ) -> tuple[subprocess.Popen[bytes], int]:
        """A child that execs argv once its go-ahead pipe (the returned fd) gets a line."""
        fifo = qemu_log_fifo(self.runtime_dir)
        make_fifo(fifo)
        # O_RDWR: opening never blocks and the pipe never loses its last writer.
        log_fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
        read_go, write_go = os.pipe()
        try:
            # Popen returns as soon as the shell is forked; nothing here blocks.
            process = subprocess.Popen(
                [*prefix, "/bin/sh", "-c", _WAIT_THEN_EXEC, label, *argv],
                stdin=read_go,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=tuple(pass_fds),
                start_new_session=True,
            )
        except BaseException:
            os.close(write_go)
            raise
        finally:
            os.close(log_fd)
            os.close(read_go)
        return process, write_go

    async def __call__(self, argv: list[str], pass_fds: Sequence[int] = ()) -> ScopedProcess:
        go: list[tuple[subprocess.Popen[bytes], int]] = []
        waits: list[tuple[subprocess.Popen[bytes], Ready]] = []
        try:
            for companion in self.companions:
                label = f"spinbox-vm-{self.vm_id}-fs"
                started = self._waiting(companion.argv, companion.fds, label, companion.prefix)
                self.companion_processes.append(started[0])
                go.append(started)
                if companion.ready is not None:
                    waits.append((started[0], companion.ready))
            for (child, _), companion in zip(go, self.companions, strict=True):
                if companion.started is not None:
                    await companion.started(child)
            self._close_companion_fds()
            self.process, write_go = self._waiting(argv, pass_fds, f"spinbox-vm-{self.vm_id}")
            go.append((self.process, write_go))
            others = [p.pid for p in self.companion_processes]
            await self.systemd.start_scope(
                self.scope, self.process.pid, self.description, self.limits, extra_pids=others
            )
            self.scope_started = True
            for process, fd in go:
                if process is self.process:
                    # The companions first, and QEMU once they are ready for it.
                    for waiting, ready in waits:
                        await ready(waiting)
                try:
                    os.write(fd, b"go\n")
                except BrokenPipeError:
                    status = process.wait()
                    raise SpawnError(
                        f"the process waiting for {self.scope} ended early (status {status})"
                    ) from None
        except BaseException:
            for _, fd in go:
                os.close(fd)
            await self.abort()
            raise
        for _, fd in go:
            os.close(fd)
        loop = asyncio.get_running_loop()
        # Reaped when they end (with QEMU, whose disconnect ends virtiofsd).
        self.reapers = [loop.create_task(wait_pid_exit(p.pid, p)) for p in self.companion_processes]
        return ScopedProcess(self.process)

    async def abort(self) -> None:
        """Undo a spawn: the children (QEMU, its companions or the waiting shells) and its scope."""
        self._close_companion_fds()
        for process in [*self.companion_processes, *([self.process] if self.process is not None else [])]:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                await asyncio.get_running_loop().run_in_executor(None, process.wait)
        if self.scope_started:
            await self.systemd.stop_unit(self.scope)
        await self.systemd.wait_gone(self.scope)
