"""When a call into the guest misses its deadline, spinboxd records where the guest is.

The shim alone sees its calls' deadlines; spinboxd alone owns QEMU (its QMP and the guest's
serial console). So the agent connection tells a GuestWatch of each miss, which asks spinboxd
over D-Bus (the VM object's RecordGuestState) to write the record into the VM's journal, in the
background: the call's error reaches containerd at once. One request at a time per VM.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from spinbox.shim.container import VmManager

log = logging.getLogger(__name__)


class GuestWatch:
    """The deadline hook (spinbox.agent.AgentClient.on_deadline) of one VM's agent connection."""

    def __init__(self, spinboxd: Callable[[], Awaitable[VmManager]], vm_id: str, vm_path: str) -> None:
        self.spinboxd = spinboxd
        self.vm_id = vm_id
        self.vm_path = vm_path
        self.task: asyncio.Task[None] | None = None

    def __call__(self, reason: str) -> None:
        if self.task is not None and not self.task.done():
            return  # the record under way shows the guest as it is now
        self.task = asyncio.get_running_loop().create_task(self._record(reason))

    async def _record(self, reason: str) -> None:
        try:
            await (await self.spinboxd()).record_guest_state(self.vm_path, reason)
        except Exception as error:
            log.warning("spinboxd could not record where VM %s's guest is: %s", self.vm_id, error)
            return
        log.warning(
            "%s; where the guest is was recorded in `journalctl -u spinbox-vm-%s.scope`", reason, self.vm_id
        )
