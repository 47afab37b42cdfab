"""vCPUs and memory the host plugged into the running VM (a resize).

The guest kernel onlines plugged memory itself (memhp_default_state on its command line);
a plugged vCPU stays offline until written online, which udev would do elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)

CPUS = Path("/sys/devices/system/cpu")
MEMINFO = Path("/proc/meminfo")
# How long a plugged vCPU may take to appear after the host's device_add (ACPI's notification).
APPEAR_TIMEOUT = 10.0
_CPU = re.compile(r"cpu[0-9]+")


def present_cpus(root: Path = CPUS) -> list[Path]:
    return sorted((p for p in root.iterdir() if _CPU.fullmatch(p.name)), key=lambda p: int(p.name[3:]))


def online_cpus(root: Path = CPUS) -> int:
    """The number of online vCPUs (cpu0 has no `online` file: it cannot go offline)."""
    count = 0
    for cpu in present_cpus(root):
        state = cpu / "online"
        if not state.exists() or state.read_text().strip() == "1":
            count += 1
    return count


def bring_online(root: Path = CPUS) -> int:
    """Writes every offline vCPU online; returns how many it brought up."""
    count = 0
    for cpu in present_cpus(root):
        state = cpu / "online"
        if state.exists() and state.read_text().strip() == "0":
            try:
                state.write_text("1")
                count += 1
            except OSError as e:
                log.error("could not bring %s online: %s", cpu.name, e)
    return count


def mem_total_kib(meminfo: Path = MEMINFO) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


async def online(vcpus: int, root: Path = CPUS, timeout: float = APPEAR_TIMEOUT) -> tuple[int, int]:  # noqa: ASYNC109
    """Waits (up to `timeout`) until the kernel has `vcpus` vCPUs, brings them online, and
    returns the online vCPUs and MemTotal in KiB."""
    deadline = time.monotonic() + timeout
    while True:
        if len(present_cpus(root)) >= vcpus or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)  # sysfs has nothing to wait on
    brought = bring_online(root)
    if brought:
        log.info("brought %d plugged vCPUs online", brought)
    return online_cpus(root), mem_total_kib()
