"""The guest's boot timeline: CLOCK_BOOTTIME stamps by phase name."""

from __future__ import annotations

import os
import time


class Timeline:
    def __init__(self) -> None:
        self.stamps: dict[str, int] = {}

    def stamp(self, phase: str) -> None:
        """Records the first time `phase` happens; later calls keep the first stamp."""
        self.stamps.setdefault(phase, time.clock_gettime_ns(time.CLOCK_BOOTTIME))

    def stamp_process_start(self, phase: str, stat: str = "/proc/self/stat") -> None:
        """Records when this process was exec'd (kernel clock ticks since boot; /proc must be mounted)."""
        try:
            with open(stat) as f:
                fields = f.read().rpartition(")")[2].split()
            ticks = int(fields[19])  # field 22 of stat, counted after the command name
        except (OSError, ValueError, IndexError):
            return
        self.stamps.setdefault(phase, ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK"))
