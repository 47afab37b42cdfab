"""A VM scope's memory events (its cgroup's memory.events), watched from when
spinboxd adopts the VM, to tell a QEMU that the kernel's OOM killer ended
(because the scope reached its MemoryMax, or the host ran out of memory) from
a QEMU that someone killed.

Watched, not read once at QEMU's exit: systemd removes the scope's cgroup, and
its memory.events with it, as soon as the scope is empty, which may be before
spinboxd has seen QEMU's exit. The kernel counts an OOM kill (oom_kill, and
oom_group_kill when the whole cgroup is killed) before it sends the victim
SIGKILL (mm/oom_kill.c, __oom_kill_process), and tells inotify that the file
changed (IN_MODIFY; a change within 10 ms of the last notification comes with
a timer instead). spinboxd reads the file at each notification and once more
at QEMU's exit; where the file is gone by then, the counts read last stand.

The kernel counts an OOM kill in the victim's cgroup whatever ran out of
memory; the cgroup's own "oom" count grows only when its limit was reached
(its charges failed after reclaim, and the OOM killer is called next), which
tells the scope's MemoryMax from the host (or a slice above the scope)
running out. Had the last read spinboxd could make shown only the "oom" count
grown, the kill's own notification was lost with the cgroup: a SIGKILL
following it is the OOM killer's too.

spinboxd makes each scope with OOMPolicy=kill, so the kernel kills all of
it at once. Should the OOM killer still pick another process of the scope
(the VM's virtiofsd) and leave QEMU running (a scope whose group kill was
turned off), a kill seen while QEMU still runs SETTLE seconds later was not
QEMU's: it is said in the journal, and a later SIGKILL of QEMU is not taken
for the OOM killer's.

Where cgroup2 offers no memory controller (no memory.events in the scope),
MemoryMax is recorded on the scope but not enforced, and there is nothing to
watch: spinboxd says so once at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from spinbox.cgroups import cgroup2_mounts, cgroup_of, controllers, v1_mount
from spinbox.vm.ending import Ending

log = logging.getLogger("spinbox.daemon.manager")

MEMORY_EVENTS = "memory.events"
# How long after an OOM kill in its scope QEMU has to be seen ending for the kill to be its.
SETTLE = 10.0
_IN_MODIFY = 0x00000002
_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


@dataclass(frozen=True)
class MemoryEvents:
    """The counts of memory.events that say the OOM killer ran in the cgroup."""

    oom: int = 0
    oom_kill: int = 0
    oom_group_kill: int = 0

    @classmethod
    def parse(cls, text: str) -> MemoryEvents:
        counts: dict[str, int] = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key in ("oom", "oom_kill", "oom_group_kill") and value.strip().isdigit():
                counts[key] = int(value)
        return cls(**counts)

    @classmethod
    def read(cls, path: Path) -> MemoryEvents:
        return cls.parse(path.read_text())


class Inotify:
    """An inotify instance watching one file for IN_MODIFY, read without blocking."""

    def __init__(self, path: Path) -> None:
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"inotify_init1: {os.strerror(errno)}")
        self.fd = fd
        if _libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
            errno = ctypes.get_errno()
            os.close(fd)
            raise OSError(errno, f"cannot watch {path}: {os.strerror(errno)}")

    def drain(self) -> None:
        """Consumes the queued events: each says only that the file changed."""
        while True:
            try:
                if not os.read(self.fd, 4096):
                    return
            except BlockingIOError:
                return

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ScopeMemoryWatch:
    """The memory events of one VM's scope since spinboxd adopted it."""

    def __init__(self, vm_id: str, path: Path, baseline: MemoryEvents) -> None:
        self.vm_id = vm_id
        self.path = path
        self.baseline = baseline
        self.last = baseline
        self.limit: int | None = None  # memory.max as last read ("max": None)
        # Whether the file could not be read at QEMU's exit (the cgroup was removed first).
        self.gone = False
        self._verdict: str | None = None
        self._inotify: Inotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def start(cls, vm_id: str, cgroup: Path) -> ScopeMemoryWatch | None:
        """Watches `cgroup`'s memory.events from now; None where it has none (no memory controller)."""
        path = cgroup / MEMORY_EVENTS
        try:
            baseline = MemoryEvents.read(path)
        except OSError:
            return None
        watch = cls(vm_id, path, baseline)
        watch._read()  # the limit
        try:
            watch._inotify = Inotify(path)
        except OSError as e:
            # Still read at QEMU's exit: only a cgroup removed before that is missed.
            log.warning("VM %s: %s; its memory events are read only when QEMU ends", vm_id, e)
            return watch
        watch._loop = asyncio.get_running_loop()
        watch._loop.add_reader(watch._inotify.fd, watch._changed)
        return watch

    @classmethod
    def for_process(cls, vm_id: str, pid: int) -> ScopeMemoryWatch | None:
        """Watches the memory events of the scope process `pid` (QEMU) runs in."""
        cgroup = cgroup_of(pid, cgroup2_mounts())
        return None if cgroup is None else cls.start(vm_id, cgroup)

    def _changed(self) -> None:
        assert self._inotify is not None and self._loop is not None
        self._inotify.drain()
        kills = self._kills(self.last)
        if self._read() and self._kills(self.last) > kills:
            self._loop.call_later(SETTLE, self._settle, self.last)

    @staticmethod
    def _kills(events: MemoryEvents) -> int:
        return events.oom_kill + events.oom_group_kill

    def _settle(self, seen: MemoryEvents) -> None:
        """QEMU still runs SETTLE s after an OOM kill in its scope: another process was killed."""
        if self._verdict is not None or self._inotify is None:
            return
        why = (
            "the scope reached its memory limit" + (f", MemoryMax={self.limit} bytes" if self.limit else "")
            if seen.oom > self.baseline.oom
            else "the host, or a slice holding the scope, ran out of memory"
        )
        log.warning(
            "VM %s: the kernel's OOM killer killed a process in its scope, not QEMU (%s); "
            "the VM runs on without it",
            self.vm_id,
            why,
        )
        self.baseline = seen

    def _read(self) -> bool:
        try:
            self.last = MemoryEvents.read(self.path)
        except OSError:
            return False
        # The limit in force, which is what the journal names (set by spinboxd, or by hand).
        with contextlib.suppress(OSError, ValueError):
            text = (self.path.parent / "memory.max").read_text().strip()
            self.limit = None if text == "max" else int(text)
        return True

    def oom_kill(self) -> str:
        """Once QEMU has ended: whether the OOM killer killed in the scope since it was watched,
        "limit" where the scope's own limit was reached (its "oom" count grew with the kill),
        "elsewhere" where it was not (the host, or a slice above the scope, ran out of memory:
        the kernel counts an OOM kill in the victim's cgroup however it came), else ""."""
        if self._verdict is None:
            self.gone = not self._read()
            self.close()
            last, first = self.last, self.baseline
            at_limit = last.oom > first.oom
            if self._kills(last) > self._kills(first):
                self._verdict = "limit" if at_limit else "elsewhere"
            else:
                self._verdict = "limit" if self.gone and at_limit else ""
        return self._verdict

    def close(self) -> None:
        if self._inotify is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None


def scope_ending(ending: Ending, watch: ScopeMemoryWatch | None, memory_max: int) -> Ending:
    """`ending`, saying so where the kernel's OOM killer ended QEMU (a SIGKILL not spinbox's
    with an OOM kill counted in its scope), and whether at the scope's limit. The limit named
    is the scope's memory.max as last read, else `memory_max` (the one spinboxd set)."""
    if watch is None or ending.panicked or ending.requested == "kill" or ending.signal != signal.SIGKILL:
        return ending
    oom = watch.oom_kill()
    if not oom:
        return ending
    # Not spinbox's end even where a stop was under way: the OOM killer's.
    limit = watch.limit or memory_max
    return dataclasses.replace(ending, oom_limit=limit, oom_at_limit=oom == "limit", requested="")


def say_if_not_enforced() -> bool:
    """At start-up: whether cgroup2 offers the memory controller to VM scopes; said once
    in the journal where it does not: the limits are recorded but not enforced, or (on a
    host whose memory controller is cgroup v1's) enforced where spinboxd does not watch."""
    mounts = cgroup2_mounts()
    own = cgroup_of(os.getpid(), mounts)
    root = next((m.path for m in reversed(mounts) if own is not None and own.is_relative_to(m.path)), None)
    available = controllers(root) if root is not None else None
    if available is not None and "memory" in available:
        return True
    where = (
        f"cgroup.controllers of {root}: {' '.join(sorted(available)) or 'none'}"
        if root is not None and available is not None
        else "spinboxd's own cgroup is on no cgroup2 mount"
    )
    v1 = v1_mount("memory")
    if v1 is not None:
        log.warning(
            "cgroup2 offers no memory controller here (%s); it is cgroup v1's (%s), where systemd "
            "enforces each VM scope's MemoryMax, but spinboxd watches only cgroup2's memory events: "
            "a VM that limit ends is said to be killed by SIGKILL, with no TaskOOM",
            where,
            v1,
        )
    else:
        log.warning(
            "cgroup2 offers no memory controller here (%s): each VM scope's MemoryMax is recorded "
            "but not enforced, and no VM's end can be told to be its memory limit's",
            where,
        )
    return False
