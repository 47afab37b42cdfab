"""vCPUs and memory the host plugged into the running VM (a resize).

The guest kernel onlines plugged memory itself (memhp_default_state on its command line);
a plugged vCPU stays offline until written online, which udev would do elsewhere.

The kernel's MemTotal does not follow the virtio-mem device's size at once. On a grow
the device plugs a memory block before the kernel adds and onlines it. On a shrink
(Debian's 6.1 kernel, measured under TCG) the driver takes the block's pages from the
allocator ("fake offline", MemTotal drops), has the device unplug them, and only then
offlines and removes the emptied block: its notifier for that counts the block's pages
back in while the block goes offline (MemTotal 128 MiB higher again, up to ~0.2 s),
until offlining subtracts them for good. So memory has settled only when MemTotal
counts what the device has plugged and no block plugged since boot is going offline or
online with every page given back (PageOffline in /proc/kpageflags).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

CPUS = Path("/sys/devices/system/cpu")
MEMINFO = Path("/proc/meminfo")
MEMORY = Path("/sys/devices/system/memory")
KPAGEFLAGS = Path("/proc/kpageflags")
# How long a plugged vCPU may take to appear after the host's device_add (ACPI's notification).
APPEAR_TIMEOUT = 10.0
# The longest a request may have vminitd wait for its memory to settle.
MAX_MEMORY_TIMEOUT = 120.0
_POLL = 0.02  # sysfs and procfs have nothing to wait on
_CPU = re.compile(r"cpu[0-9]+")
_BLOCK = re.compile(r"memory[0-9]+")
KPF_OFFLINE = 1 << 23  # include/uapi/linux/kernel-page-flags.h: PageOffline
_KPF_ENTRY = 8


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


class BootMemory(NamedTuple):
    """The memory the guest booted with, read before anything was plugged."""

    mem_total_kib: int
    blocks: frozenset[str]  # its memory blocks' names in /sys/devices/system/memory

    @classmethod
    def read(cls, memory: Path = MEMORY, meminfo: Path = MEMINFO) -> BootMemory:
        return cls(mem_total_kib(meminfo), frozenset(_blocks(memory)))


class MemoryView(NamedTuple):
    mem_total_kib: int
    removing_blocks: int  # plugged since boot, still being taken out by the kernel

    def settled(self, boot: BootMemory, plugged_kib: int) -> bool:
        return self.mem_total_kib - boot.mem_total_kib == plugged_kib and not self.removing_blocks


def memory_view(
    boot: BootMemory, memory: Path = MEMORY, meminfo: Path = MEMINFO, kpageflags: Path = KPAGEFLAGS
) -> MemoryView:
    # MemTotal first: once it counts a shrink's last step, that block's pages are all
    # PageOffline already (they are marked before MemTotal drops), so a block read later is
    # seen as being removed until it is offline. Read the other way round, a block not yet
    # emptied and MemTotal just after its drop would look settled.
    total = mem_total_kib(meminfo)
    removing = 0
    added = sorted(set(_blocks(memory)) - boot.blocks)
    pages = _block_pages(memory) if added else 0
    for name in added:
        try:
            state = (memory / name / "state").read_text().strip()
        except OSError:
            continue  # removed since listed (ENOENT), or being removed (ENODEV): offline already
        if state == "going-offline" or (
            state == "online" and _given_back(kpageflags, int(name.removeprefix("memory")) * pages, pages)
        ):
            removing += 1
    return MemoryView(total, removing)


def _blocks(memory: Path) -> list[str]:
    """The memory blocks' names; none for a kernel without memory hotplug (no such directory)."""
    try:
        return [p.name for p in memory.iterdir() if _BLOCK.fullmatch(p.name)]
    except FileNotFoundError:
        return []


def _block_pages(memory: Path) -> int:
    return int((memory / "block_size_bytes").read_text().strip(), 16) // os.sysconf("SC_PAGE_SIZE")


def _given_back(kpageflags: Path, first_pfn: int, pages: int) -> bool:
    """Whether every page of the block is PageOffline (virtio-mem gave it back to the device).
    The first page is read alone first: virtio-mem gives a block back from its top, so a block
    in use is told by 8 bytes rather than the whole block's 256 KiB of flags."""
    try:
        with open(kpageflags, "rb") as flags:
            flags.seek(first_pfn * _KPF_ENTRY)
            first = memoryview(flags.read(_KPF_ENTRY)).cast("Q")
            if len(first) != 1 or not first[0] & KPF_OFFLINE:
                return False
            rest = memoryview(flags.read((pages - 1) * _KPF_ENTRY)).cast("Q")
    except OSError:
        return False  # offline and gone since (its pages read as KPF_NOPAGE then, not offline)
    return len(rest) == pages - 1 and all(entry & KPF_OFFLINE for entry in rest)


async def online(vcpus: int, root: Path = CPUS, timeout: float = APPEAR_TIMEOUT) -> int:  # noqa: ASYNC109
    """Waits (up to `timeout`) until the kernel has `vcpus` vCPUs, brings them online, and
    returns the online vCPUs."""
    deadline = time.monotonic() + timeout
    while True:
        if len(present_cpus(root)) >= vcpus or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)  # sysfs has nothing to wait on
    brought = bring_online(root)
    if brought:
        log.info("brought %d plugged vCPUs online", brought)
    return online_cpus(root)


async def settle_memory(
    boot: BootMemory,
    plugged_kib: int,
    timeout: float,  # noqa: ASYNC109
    view: Callable[[BootMemory], MemoryView] = memory_view,
) -> MemoryView:
    """Waits (up to `timeout`, at most MAX_MEMORY_TIMEOUT) until the kernel counts `plugged_kib`
    beyond its boot memory and removes no block; returns what it has then."""
    timeout = min(max(timeout, 0.0), MAX_MEMORY_TIMEOUT)
    deadline = time.monotonic() + timeout
    while True:
        now = view(boot)
        if now.settled(boot, plugged_kib) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(_POLL)
    if not now.settled(boot, plugged_kib):
        log.warning(
            "memory did not settle in %.1f s: MemTotal %d KiB (%d KiB at boot, %d KiB plugged), "
            "%d memory blocks still being removed",
            timeout, now.mem_total_kib, boot.mem_total_kib, plugged_kib, now.removing_blocks,
        )  # fmt: skip
    return now
