"""The guest's boot timeline: CLOCK_BOOTTIME stamps by phase name."""

from __future__ import annotations

import time


class Timeline:
    def __init__(self) -> None:
        self.stamps: dict[str, int] = {}

    def stamp(self, phase: str) -> None:
        """Records the first time `phase` happens; later calls keep the first stamp."""
        self.stamps.setdefault(phase, time.clock_gettime_ns(time.CLOCK_BOOTTIME))
