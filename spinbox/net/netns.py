"""Network namespaces: running code inside one, creating and removing pinned ones.

A namespace belongs to a thread, so code that must act inside one runs in a
short-lived thread that enters it (setns) and exits afterwards: the daemon's
own threads never change namespace. Sockets and TAP file descriptors opened
there keep working from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pyroute2 import netns as pyroute2_netns

from spinbox import procstat
from spinbox.net.errors import NetworkError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
# nsenter takes milliseconds; this only bounds a wait that cannot succeed.
HOLDER_START_TIMEOUT = 30.0

# pyroute2's netns module enters and removes namespaces (setns, remove). Creating
# one stays here: its create() forks the (threaded) daemon and turns the
# namespace directory into a shared mount; a short-lived thread that unshares
# and binds its own /proc/self/task/<tid>/ns/net does neither.
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _setns(path: str) -> None:
    try:
        pyroute2_netns.setns(path, flags=0)  # flags=0: enter only, never create
    except OSError as error:
        raise OSError(error.errno, f"setns {path}: {os.strerror(error.errno or 0)}") from None


def run_in(path: str, fn: Callable[[], T]) -> T:
    """Run fn in a new thread that first enters the network namespace at `path`."""
    return _in_thread(lambda: _setns(path), fn)


def _in_thread(enter: Callable[[], None], fn: Callable[[], T]) -> T:
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            enter()
            outcome.append(fn())
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=target, name="spinbox-netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


async def run_in_async(path: str, fn: Callable[[], T]) -> T:
    """run_in without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, run_in, path, fn)


def in_new_namespace(fn: Callable[[], T]) -> T:
    """Run fn in a new thread that first enters a new, empty network namespace, which ends once
    nothing holds it (fn may open a descriptor of it to keep it)."""
    return _in_thread(lambda: _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)"), fn)


def create(path: Path) -> None:
    """Create a new, empty network namespace pinned at `path` (a bind mount of its nsfs file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(exist_ok=False)

    def pin() -> None:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        source = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        target = str(path).encode()
        _check(_libc.mount(source, target, None, MS_BIND, None), f"pin network namespace at {path}")

    try:
        _in_thread(lambda: None, pin)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def remove(path: Path) -> None:
    """Unpin and remove a namespace made by create(); nothing to do if it is gone."""
    with contextlib.suppress(FileNotFoundError):
        pyroute2_netns.remove(str(path))


def is_pinned(path: Path) -> bool:
    """Whether `path` is a network namespace file (and not the empty file under it)."""
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except OSError:
        return False


def inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def start_holder(path: Path) -> tuple[int, int]:
    """Start a process that lives inside the namespace, for OCI hooks that use /proc/<pid>/ns/net.

    Returns (pid, start time): the pair identifies the process even after its pid is reused.
    """
    # nsenter enters the namespace, then execs sleep in the same process.
    proc = subprocess.Popen(
        ["nsenter", f"--net={path}", "--", "sleep", "infinity"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,
    )
    # Reap it whenever it ends, so it never lingers as a zombie of the daemon.
    threading.Thread(target=proc.wait, name="spinbox-netns-holder", daemon=True).start()
    expected = inode(str(path))
    deadline = time.monotonic() + HOLDER_START_TIMEOUT
    while inode(f"/proc/{proc.pid}/ns/net") != expected:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise NetworkError(f"could not start a process inside the network namespace {path}")
        time.sleep(0.005)
    return proc.pid, procstat.start_time(proc.pid) or 0


def stop_holder(pid: int, started: int) -> None:
    """Kill the holder if process `pid` is still the one started at `started`."""
    if pid <= 0 or procstat.start_time(pid) != started:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
