"""spinboxctl top: each VM's CPU and memory, live from its scope's cgroup
(cpu.stat's usage_usec, memory.current), as a plain refreshing table."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class Usage:
    """One reading of a cgroup: CPU time used so far and memory in use (None where unreadable)."""

    cpu_usec: int | None
    memory: int | None
    at: float


@dataclass(frozen=True)
class Cgroup2Mount:
    """Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup, or .../unified on a
    hybrid host), and which of its cgroups is the mount's root ("/" unless the
    mount was made in another cgroup namespace than the reader's)."""

    path: Path
    root: str = "/"


def cgroup2_mount(mountinfo: Path = MOUNTINFO) -> Cgroup2Mount | None:
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # Optional fields end with "-"; the filesystem type follows it.
        if "-" in fields and fields[fields.index("-") + 1] == "cgroup2":
            return Cgroup2Mount(Path(fields[4]), fields[3])
    return None


def cgroup_of(pid: int, mount: Cgroup2Mount | None) -> Path | None:
    """The cgroup2 directory of process `pid` (QEMU's is its VM's scope)."""
    if mount is None or pid <= 0:
        return None
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    root = mount.root.rstrip("/") + "/"
    for line in lines:
        if line.startswith("0::"):
            cgroup = line[3:].rstrip("/") + "/"
            if not cgroup.startswith(root):
                return None  # outside the part of the hierarchy mounted here
            return mount.path / cgroup[len(root) :].strip("/")
    return None


def read_usage(cgroup: Path | None) -> Usage:
    cpu = memory = None
    if cgroup is not None:
        try:
            for line in (cgroup / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    cpu = int(value)
        except (OSError, ValueError):
            pass
        with contextlib.suppress(OSError, ValueError):  # no memory controller: shown as "-"
            memory = int((cgroup / "memory.current").read_text())
    return Usage(cpu, memory, time.monotonic())


def cpu_percent(before: Usage, after: Usage) -> str:
    """CPU use between two readings, 100% being one CPU busy the whole time."""
    if before.cpu_usec is None or after.cpu_usec is None or after.at <= before.at:
        return "-"
    return f"{(after.cpu_usec - before.cpu_usec) / 1e6 / (after.at - before.at) * 100:.1f}"


def cpu_time(usage: Usage) -> str:
    return "-" if usage.cpu_usec is None else f"{usage.cpu_usec / 1e6:.1f}s"


def memory(usage: Usage) -> str:
    return "-" if usage.memory is None else f"{usage.memory / (1 << 20):.1f} MiB"
