"""Network namespaces spinboxd holds for OCI hooks before a VM exists (PrepareNetworkNamespace).

Each is a named namespace (`ip netns`, /run/netns/spinbox-<id>) with one
sleeping host process inside it, whose pid hooks may use to enter it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path

from spinbox.daemon.errors import AlreadyExists
from spinbox.daemon.process import wait_pid_exit

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")


def netns_name(vm_id: str) -> str:
    return f"spinbox-{vm_id}"


async def _run(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {err.decode(errors='replace').strip()}")


class NetnsHolder:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._reapers: set[asyncio.Task[None]] = set()

    def path(self, vm_id: str) -> Path:
        return NETNS_DIR / netns_name(vm_id)

    def holds(self, vm_id: str, netns: str | None) -> bool:
        return netns is not None and Path(netns) == self.path(vm_id) and self._pid_file(vm_id).exists()

    def _pid_file(self, vm_id: str) -> Path:
        return self.state_dir / f"{vm_id}.pid"

    async def prepare(self, vm_id: str) -> tuple[str, int]:
        if self._pid_file(vm_id).exists():
            raise AlreadyExists(f"a network namespace for {vm_id!r} is already prepared")
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = netns_name(vm_id)
        await _run("ip", "netns", "add", name)
        try:
            holder = subprocess.Popen(  # noqa: ASYNC220
                ["ip", "netns", "exec", name, "sleep", "infinity"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            await _run("ip", "netns", "delete", name)
            raise
        self._pid_file(vm_id).write_text(str(holder.pid))
        # Reaped when it ends (by us, or by init after a restart).
        task = asyncio.get_running_loop().create_task(wait_pid_exit(holder.pid, holder))
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)
        return str(self.path(vm_id)), holder.pid

    async def remove(self, vm_id: str) -> None:
        pid_file = self._pid_file(vm_id)
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
        if self.path(vm_id).exists():
            try:
                await _run("ip", "netns", "delete", netns_name(vm_id))
            except RuntimeError as e:
                log.warning("%s", e)

    async def collect_leftovers(self, live: set[str]) -> None:
        if not self.state_dir.exists():
            return
        for pid_file in self.state_dir.glob("*.pid"):
            vm_id = pid_file.name.removesuffix(".pid")
            if vm_id not in live:
                await self.remove(vm_id)
