"""Host processes spinboxd watches: alive or not, and waiting for their end."""

from __future__ import annotations

import asyncio
import os
import subprocess

from spinbox import procstat


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = procstat.stat_fields(pid)
    return fields is not None and fields[0] != "Z"


async def wait_pid_exit(pid: int, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait for `pid` to end (pidfd, no thread), reaping it when it is our child `process`."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        if process is not None:
            process.poll()
        return
    done: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    if process is not None:
        process.wait()
