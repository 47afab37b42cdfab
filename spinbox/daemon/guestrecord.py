"""A record of where a VM's guest is, written into that VM's journal.

Asked for when a call into the guest missed its deadline (the shim's, through the VM object's
RecordGuestState, or spinboxd's own, such as a resize's): QEMU's view of each vCPU
(spinbox.vm.gueststate), then the guest kernel's backtraces of every CPU and its blocked tasks
over the serial console (magic SysRq), which the console forwarder files like every console
line. One record at a time per VM, with a deadline of its own: a call while one is being made
waits for that one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from spinbox.daemon.errors import Failed, GuestUnsettled
from spinbox.ttrpc import Code, TtrpcError
from spinbox.vm import gueststate

if TYPE_CHECKING:
    from spinbox.daemon.manager import Vm

log = logging.getLogger(__name__)

RECORD_TIMEOUT = 30.0
IDENTIFIER = "spinboxd"  # the record's SYSLOG_IDENTIFIER in the VM's journal
WARNING, ERROR = 4, 3


async def record_guest_state(vm: Vm, reason: str) -> None:
    """Writes the record into the VM's journal; Failed for a VM that is not running or paused."""
    if vm.phase not in ("running", "paused"):
        raise Failed(f"VM {vm.id!r} is {vm.phase}: there is no guest to record")
    await asyncio.shield(_start(vm, reason[:500]))


def record_if_missed(vm: Vm, error: BaseException) -> None:
    """Starts a record, not waited for, when `error` is spinboxd's own call into the guest that
    missed its deadline, or a resize whose guest did not count its new size in time (the error
    goes to its caller at once)."""
    if vm.phase != "running":
        return
    if isinstance(error, TtrpcError) and error.code == Code.DEADLINE_EXCEEDED:
        _start(vm, error.message)
    elif isinstance(error, GuestUnsettled):
        _start(vm, error.text)


def _start(vm: Vm, reason: str) -> asyncio.Task[None]:
    """The record under way for the VM, or a new one."""
    if vm.recording is None or vm.recording.done():
        vm.recording = asyncio.get_running_loop().create_task(_record(vm, reason))
    return vm.recording


async def _record(vm: Vm, reason: str) -> None:
    def say(line: str, priority: int = WARNING) -> None:
        vm.forwarder.sink(IDENTIFIER, line, priority)

    say(f"recording where the guest is: {reason or 'asked for'}")
    try:
        async with asyncio.timeout(RECORD_TIMEOUT):
            for line in await gueststate.describe_vcpus(vm.machine):
                say(line)
            if vm.phase == "paused":
                say("the VM is paused: its guest kernel cannot be asked for backtraces")
                return
            loglevel = gueststate.console_loglevel(gueststate.kernel_args_of(vm.machine.pid))
            for index, keys in enumerate(gueststate.sysrq_sequence(loglevel)):
                if index:
                    await asyncio.sleep(gueststate.SYSRQ_PAUSE)
                if not await vm.forwarder.write_console(keys):
                    say("the serial console is not connected: no backtraces from the guest kernel")
                    return
            say(
                "asked the guest kernel for every CPU's backtrace and its blocked tasks (magic SysRq "
                "l and w on the serial console): its answer, if it can give one, follows as "
                "spinbox-console lines"
            )
    except TimeoutError:
        say(f"the record of where the guest is did not finish within {RECORD_TIMEOUT:g} s", ERROR)
    except Exception as error:
        log.warning("recording where VM %s's guest is failed: %s", vm.id, error)
        say(f"could not record where the guest is: {error}", ERROR)
