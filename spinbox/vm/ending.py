"""How a VM's QEMU ended, said as a sentence for the journal and as the exit
status of the container processes that ended with it.

A process inside the guest has no exit status of its own when its VM goes
away: it ends because QEMU did. The status reported for it follows the usual
shell convention where that is true, and is "unknown" otherwise:

- QEMU killed by signal N (someone's `kill -9`, the kernel's OOM killer when
  the VM's scope reached its MemoryMax): 128 + N, as for a process killed by
  that signal;
- anything else (a guest kernel panic, QEMU failing, a status nobody could
  read because an earlier spinboxd started QEMU): 255, the status containerd
  itself gives an exit it does not know.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

# The exit status of a process whose VM ended in a way that gives it none.
UNKNOWN_STATUS = 255


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(frozen=True)
class Ending:
    """QEMU's end: its wait status (negative: killed by that signal; None:
    not known), whether the guest kernel panicked first, whether spinbox
    itself asked for it (a stop or kill), and the VM scope's memory limit in
    bytes where the kernel's OOM killer ended QEMU: at that limit, or (not
    oom_at_limit) below it, when the host or a slice above the scope ran out
    of memory."""

    status: int | None
    panicked: bool = False
    requested: str = ""  # "stop" or "kill" when spinbox ended it
    oom_limit: int | None = None
    oom_at_limit: bool = True

    @property
    def cause(self) -> str:
        """What ended QEMU, as a word a program can compare (VMEndingCause's cause)."""
        if self.panicked:
            return "panic"
        if self.oom_limit is not None:
            return "oom-kill"
        if self.signal and self.requested == "kill" and self.signal == signal.SIGKILL:
            return "requested"
        if self.signal:
            return "signal"
        if self.status is None:
            return "unknown"
        return "requested" if self.requested else "exit"

    @property
    def signal(self) -> int:
        return -self.status if self.status is not None and self.status < 0 else 0

    @property
    def reason(self) -> str:
        if self.panicked:
            return "the guest kernel panicked (QEMU's pvpanic device reported it) and QEMU exited"
        if self.oom_limit is not None and self.oom_at_limit:
            return (
                f"the VM's scope reached its memory limit (MemoryMax={self.oom_limit} bytes) "
                f"and the kernel's OOM killer ended QEMU ({signal_name(self.signal)})"
            )
        if self.oom_limit is not None:
            return (
                f"the kernel's OOM killer ended QEMU ({signal_name(self.signal)}) below the memory "
                f"limit of the VM's scope (MemoryMax={self.oom_limit} bytes): the host, or a slice "
                "holding the scope, ran out of memory"
            )
        if self.signal:
            name = signal_name(self.signal)
            if self.requested == "kill" and self.signal == signal.SIGKILL:
                return f"spinbox killed QEMU ({name}) to stop the VM"
            return f"QEMU was killed by {name}, not by spinbox"
        if self.status is None:
            return "QEMU ended; its exit status is unknown (an earlier spinboxd started it)"
        if self.status == 0:
            if self.requested:
                return "QEMU exited normally as spinbox asked"
            return "QEMU exited normally (the guest powered off)"
        return f"QEMU exited with status {self.status}"

    @property
    def container_status(self) -> int:
        """The exit status of a container process that ended with the VM."""
        if self.signal and not self.panicked:
            return 128 + self.signal
        return UNKNOWN_STATUS
