"""spinboxctl top: each VM's CPU and memory, live from its scope's cgroup
(cpu.stat's usage_usec, memory.current), as a plain refreshing table."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

# Re-exported: spinboxctl's top finds each VM's scope through them.
from spinbox.cgroups import Cgroup2Mount as Cgroup2Mount
from spinbox.cgroups import cgroup2_mounts as cgroup2_mounts
from spinbox.cgroups import cgroup_of as cgroup_of


@dataclass(frozen=True)
class Usage:
    """One reading of a cgroup: CPU time used so far and memory in use (None where unreadable)."""

    cpu_usec: int | None
    memory: int | None
    at: float


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
