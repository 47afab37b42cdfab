"""The guest's boot timeline: CLOCK_BOOTTIME stamps by phase name."""

from __future__ import annotations

import time


class Timeline:
    def __init__(self) -> None:
        self.stamps: dict[str, int] = {}

    def stamp(self, phase: str) -> None:
        """Records the first time `phase` happens; later calls keep the first stamp."""
        self.stamps.setdefault(phase, time.clock_gettime_ns(time.CLOCK_BOOTTIME))

    def stamp_kernel_message(self, phase: str, message: str, kernel_log: str) -> None:
        """Records the time of the last `[seconds] message` line of the kernel log (printk time).

        PID 1's start time in /proc says when the kernel forked it, early in boot,
        not when it exec'd /init: the kernel's own "Run /init" line says that.
        """
        end = kernel_log.rfind(f"] {message}")
        if end < 0:
            return
        start = kernel_log.rfind("[", 0, end)
        try:
            seconds, _, micros = kernel_log[start + 1 : end].strip().partition(".")
            self.stamps.setdefault(phase, int(seconds) * 1_000_000_000 + int(micros.ljust(6, "0")[:6]) * 1000)
        except ValueError:
            return
