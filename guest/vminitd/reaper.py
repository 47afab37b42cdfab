"""Child processes: spawning them and reaping every exit in one place.

vminitd is PID 1 in the guest (and a child subreaper on a host), so container
processes, orphans included, become its children. The SIGCHLD handler reaps
them all with waitpid(-1) and hands each status to whoever watches that pid;
nothing else in vminitd may call waitpid, or an exit status would be lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import OrderedDict
from collections.abc import Sequence

log = logging.getLogger(__name__)

_UNCLAIMED_MAX = 1024


def exit_code(status: int) -> int:
    """A wait status as a shell exit code: 128+N for a process killed by signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class Reaper:
    def __init__(self) -> None:
        self._watchers: dict[int, asyncio.Future[int]] = {}
        # Exits nobody watched yet: a container's init can exit before its pid is known.
        self._unclaimed: OrderedDict[int, int] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            future = self._watchers.pop(pid, None)
            if future is not None and not future.done():
                future.set_result(status)
            else:
                log.debug("reaped pid %d (status %d)", pid, exit_code(status))
                self._unclaimed[pid] = status
                while len(self._unclaimed) > _UNCLAIMED_MAX:
                    self._unclaimed.popitem(last=False)

    def watch(self, pid: int) -> asyncio.Future[int]:
        """A future for the wait status of `pid`, a child (or reparented orphan) of this process."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        if pid in self._unclaimed:
            future.set_result(self._unclaimed.pop(pid))
        else:
            self._watchers[pid] = future
        return future

    def spawn(
        self,
        argv: Sequence[str],
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        env: dict[str, str] | None = None,
        executable: str | None = None,
    ) -> tuple[int, asyncio.Future[int]]:
        """Starts `executable` (argv[0] when None; a full path) with the given fds as its stdio
        (None: /dev/null)."""
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            actions = [
                (os.POSIX_SPAWN_DUP2, devnull if fd is None else fd, target)
                for target, fd in enumerate((stdin, stdout, stderr))
            ]
            pid = os.posix_spawn(
                executable or argv[0],
                list(argv),
                env if env is not None else dict(os.environ),
                file_actions=actions,
                setsigdef=(signal.SIGCHLD, signal.SIGPIPE, signal.SIGTERM, signal.SIGINT),
            )
        finally:
            os.close(devnull)
        # A pid just handed out cannot have an old status pending any more.
        self._unclaimed.pop(pid, None)
        return pid, self.watch(pid)
