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


def cgroup2_mounts(mountinfo: Path = MOUNTINFO) -> list[Cgroup2Mount]:
    """Every cgroup2 mount, in mount order (a later one may hide an earlier one)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        fields = line.split()
        # Optional fields end with "-"; the filesystem type follows it.
        if "-" in fields and fields[fields.index("-") + 1] == "cgroup2":
            mounts.append(Cgroup2Mount(Path(fields[4]), fields[3]))
    return mounts


def cgroup_of(pid: int, mounts: list[Cgroup2Mount], proc: Path = Path("/proc")) -> Path | None:
    """The cgroup2 directory of process `pid` (QEMU's is its VM's scope), through
    the last mount that shows it (None if none does)."""
    if pid <= 0:
        return None
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    cgroup = next((line[3:].rstrip("/") + "/" for line in lines if line.startswith("0::")), None)
    if cgroup is None:
        return None
    for mount in reversed(mounts):
        root = mount.root.rstrip("/") + "/"
        if cgroup.startswith(root):  # else outside the part of the hierarchy mounted there
            path = mount.path / cgroup[len(root) :].strip("/")
            if path.is_dir():
                return path
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
