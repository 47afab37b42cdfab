"""How the VMs that ended lately ended (spinbox.vm.ending), for the shims whose
containers ended with them: said once in the journal, kept for a while."""

from __future__ import annotations

import collections
import logging

from spinbox.daemon.logs import Sink
from spinbox.vm.ending import Ending

log = logging.getLogger("spinbox.daemon.manager")

# How many of the VMs that ended last spinboxd remembers the end of.
ENDINGS_KEPT = 256


class Endings:
    def __init__(self, kept: int = ENDINGS_KEPT) -> None:
        self._kept = kept
        self._endings: collections.OrderedDict[str, Ending] = collections.OrderedDict()

    def get(self, vm_id: str) -> Ending | None:
        return self._endings.get(vm_id)

    def __contains__(self, vm_id: str) -> bool:
        return vm_id in self._endings

    def record(self, vm_id: str, ending: Ending, pid: int, sink: Sink | None = None) -> None:
        """Says how the VM's QEMU ended, in spinboxd's journal and (through `sink`) the VM's own."""
        self._endings[vm_id] = ending
        self._endings.move_to_end(vm_id)
        while len(self._endings) > self._kept:
            self._endings.popitem(last=False)
        message = f"VM {vm_id}: {ending.reason} (QEMU pid {pid})"
        if not ending.requested:
            message += f"; the processes in it end with exit status {ending.container_status}"
        log.log(logging.INFO if ending.requested else logging.WARNING, "%s", message)
        if sink is not None:
            sink("spinboxd", message, 6 if ending.requested else 4)
