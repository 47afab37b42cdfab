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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from spinbox.daemon.process import wait_pid_exit
from spinbox.daemon.systemd import ScopeLimits, SystemdManager, scope_name

# $0 is a label for ps; stdin is the go-ahead pipe (a shell redirects only
# single-digit fds). `read` fails at EOF, i.e. when spinboxd closes the pipe
# without a go-ahead. QEMU then gets /dev/null as stdin.
_WAIT_THEN_EXEC = 'read -r go || exit 97; exec </dev/null; exec "$@"'

QEMU_LOG_FIFO = "qemu.log"


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

    async def __call__(self, argv: list[str], pass_fds: Sequence[int] = ()) -> ScopedProcess:
        fifo = qemu_log_fifo(self.runtime_dir)
        make_fifo(fifo)
        # O_RDWR: opening never blocks and the pipe never loses its last writer.
        log_fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
        read_go, write_go = os.pipe()
        try:
            # Popen returns as soon as the shell is forked; nothing here blocks.
            self.process = subprocess.Popen(  # noqa: ASYNC220
                ["/bin/sh", "-c", _WAIT_THEN_EXEC, f"spinbox-vm-{self.vm_id}", *argv],
                stdin=read_go,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=tuple(pass_fds),
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
            os.close(read_go)
        pid = self.process.pid
        try:
            await self.systemd.start_scope(self.scope, pid, self.description, self.limits)
            self.scope_started = True
            try:
                os.write(write_go, b"go\n")
            except BrokenPipeError:
                status = self.process.wait()
                raise SpawnError(
                    f"the process waiting for {self.scope} ended early (status {status})"
                ) from None
        except BaseException:
            os.close(write_go)
            await self.abort()
            raise
        os.close(write_go)
        return ScopedProcess(self.process)

    async def abort(self) -> None:
        """Undo a spawn: the child (QEMU or the waiting shell) and its scope."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            await asyncio.get_running_loop().run_in_executor(None, self.process.wait)
        if self.scope_started:
            await self.systemd.stop_unit(self.scope)
        await self.systemd.wait_gone(self.scope)
