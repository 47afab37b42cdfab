"""Resizing a running VM: vCPUs by CPU hotplug, memory by its virtio-mem device.

A VM is resizable between the size it booted with and the maximum its command line
reserved (VmSpec.max_vcpus, max_memory_mib: `-smp maxcpus`, the virtio-mem region).
Everything here is read back from QEMU, so a re-adopted VM resizes like a new one.

A resize returns once the guest's own view agrees with the machine: its kernel has the
vCPUs online and counts exactly the memory the virtio-mem device has plugged (vminitd's
OnlineResources waits for that; the device's size moves before the guest's MemTotal on a
grow, and on a shrink MemTotal dips and comes back for a moment while the kernel removes
an emptied memory block). What the guest answers is checked against what the VM can have.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from spinbox.agent import AgentClient
from spinbox.vm import control
from spinbox.vm.errors import VmError
from spinbox.vm.qemu import VIRTIO_MEM

MIB = 1024 * 1024
KIB = 1024
MIB_KIB = MIB // KIB
# How long the guest may take to plug or give back memory, and to let go of a vCPU.
RESIZE_TIMEOUT = 60.0
# The least time the guest's kernel gets to count the device's memory, also when the device
# took most of the resize's deadline, and how long vminitd may take to answer beyond that.
SETTLE_MIN = 5.0
ANSWER_MARGIN = 10.0
_POLL = 0.05
_VIRTIO_MEM_PATH = f"/machine/peripheral/{VIRTIO_MEM}"
# Hot-plugged vCPUs are QEMU devices with ids of this prefix (their boot siblings have none).
_CPU_ID = "vcpu"


class Qmp(Protocol):
    """What a resize needs of a VM (spinbox.vm.VirtualMachine)."""

    @property
    def vm_id(self) -> str: ...

    @property
    def control_address(self) -> str: ...

    async def query(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...


class ResizeError(VmError):
    """A resize that did not happen: the VM keeps the size it had."""


class SizeOutOfRange(ResizeError):
    """A size beyond the VM's maximum, or below what it booted with."""


class GuestRefused(ResizeError):
    """The guest did not give back (or take) what was asked within the deadline."""


@dataclass(frozen=True)
class VmSize:
    vcpus: int
    memory_mib: int


@dataclass(frozen=True)
class GuestView:
    """What the guest's kernel has: online vCPUs and /proc/meminfo's MemTotal."""

    cpus: int
    mem_total_kib: int


@dataclass(frozen=True)
class Resized:
    size: VmSize  # the machine's, read back from QEMU
    guest: GuestView


class GuestUnsettled(ResizeError):
    """The machine has its new size but the guest's kernel did not count it within the deadline
    (or answered with a size it cannot have): `size` is the machine's."""

    def __init__(self, message: str, size: VmSize) -> None:
        super().__init__(message)
        self.size = size


@dataclass(frozen=True)
class SizeRange:
    boot: VmSize
    max: VmSize
    memory_step_mib: int  # the virtio-mem block size; 0: memory is not resizable


async def size_range(qmp: Qmp) -> SizeRange:
    boot_memory, device = await _memory(qmp)
    cpus = await qmp.query("query-hotpluggable-cpus")
    boot_cpus = sum(1 for cpu in cpus if "qom-path" in cpu and not _hotplugged(cpu))
    if device is None:
        return SizeRange(VmSize(boot_cpus, boot_memory), VmSize(len(cpus), boot_memory), 0)
    top = boot_memory + int(device["max-size"]) // MIB
    return SizeRange(VmSize(boot_cpus, boot_memory), VmSize(len(cpus), top), int(device["block-size"]) // MIB)


async def current_size(qmp: Qmp) -> VmSize:
    boot_memory, device = await _memory(qmp)
    cpus = await qmp.query("query-hotpluggable-cpus")
    plugged = int(device["size"]) // MIB if device is not None else 0
    return VmSize(sum(1 for cpu in cpus if "qom-path" in cpu), boot_memory + plugged)


def check_size(vm_id: str, limits: SizeRange, target: VmSize) -> VmSize:
    """The size a resize to `target` gives (memory rounded up to the device's step), or SizeOutOfRange."""
    if target.vcpus > limits.max.vcpus:
        raise SizeOutOfRange(
            f"VM {vm_id} can have at most {limits.max.vcpus} vCPUs (the maximum it was started with), "
            f"not {target.vcpus}"
        )
    if target.vcpus < limits.boot.vcpus:
        raise SizeOutOfRange(
            f"VM {vm_id} cannot go below the {limits.boot.vcpus} vCPUs it booted with "
            f"(it can only add to those), so not to {target.vcpus}"
        )
    if target.memory_mib < limits.boot.memory_mib:
        raise SizeOutOfRange(
            f"VM {vm_id} cannot give back the {limits.boot.memory_mib} MiB it booted with "
            f"(only plugged memory can be unplugged), so not shrink to {target.memory_mib} MiB"
        )
    memory = target.memory_mib
    if limits.memory_step_mib:
        memory = limits.boot.memory_mib + _round_up(memory - limits.boot.memory_mib, limits.memory_step_mib)
    if memory > limits.max.memory_mib:
        raise SizeOutOfRange(
            f"VM {vm_id} can have at most {limits.max.memory_mib} MiB of memory "
            f"(the maximum it was started with), not {target.memory_mib} MiB"
        )
    return VmSize(target.vcpus, memory)


async def resize(qmp: Qmp, target: VmSize, timeout: float = RESIZE_TIMEOUT) -> Resized:  # noqa: ASYNC109
    """Give the VM `target`'s vCPUs and memory; returns the size it has then and what its
    guest sees, once the guest's kernel has every plugged vCPU online (vminitd brings them
    up) and counts the memory the device has plugged: GuestUnsettled if it does not in time.
    """
    limits = await size_range(qmp)
    target = check_size(qmp.vm_id, limits, target)
    deadline = time.monotonic() + timeout
    await _add_cpus(qmp, target.vcpus)
    await _resize_memory(qmp, limits.boot.memory_mib, target.memory_mib, deadline)
    size = await current_size(qmp)
    guest = await settle(qmp, limits, size, max(deadline - time.monotonic(), SETTLE_MIN))
    return Resized(size, guest)


async def settle(qmp: Qmp, limits: SizeRange, size: VmSize, timeout: float) -> GuestView:  # noqa: ASYNC109
    """Has vminitd bring the VM's vCPUs online and wait (up to `timeout`) until its kernel
    counts the memory the device has plugged; returns what the guest has, checked."""
    plugged_mib = size.memory_mib - limits.boot.memory_mib

    async def online(agent: AgentClient) -> Any:
        return await agent.online_resources(size.vcpus, plugged_mib * MIB_KIB, timeout)

    started = time.monotonic()
    answer = await control.session(qmp.control_address, online, timeout + ANSWER_MARGIN)
    waited = time.monotonic() - started
    cpus, total, boot_total, removing = (
        int(answer.online_cpus),
        int(answer.mem_total_kib),
        int(answer.boot_mem_total_kib),
        int(answer.removing_memory_blocks),
    )
    most_kib = limits.max.memory_mib * MIB_KIB
    if not (
        0 < cpus <= limits.max.vcpus
        and 0 < boot_total <= limits.boot.memory_mib * MIB_KIB
        and total <= most_kib
    ):
        raise GuestUnsettled(
            f"VM {qmp.vm_id}'s guest answered with sizes it cannot have ({cpus} vCPUs online, MemTotal "
            f"{total} KiB, {boot_total} KiB at boot) for a VM of at most {limits.max.vcpus} vCPUs and "
            f"{limits.max.memory_mib} MiB that booted with {limits.boot.memory_mib} MiB",
            size,
        )
    counted_kib = total - boot_total
    if counted_kib != plugged_mib * MIB_KIB or removing:
        still = f", and is still removing {removing} memory blocks" if removing else ""
        raise GuestUnsettled(
            f"VM {qmp.vm_id}'s guest did not count the memory its virtio-mem device has plugged within "
            f"{waited:.1f} s: its kernel counts {counted_kib / KIB:g} MiB beyond the memory it booted "
            f"with (MemTotal {total} KiB){still}, the device {plugged_mib} MiB (the VM has "
            f"{size.memory_mib} MiB)",
            size,
        )
    if cpus < size.vcpus:
        raise GuestUnsettled(
            f"VM {qmp.vm_id}'s guest has {cpus} of its {size.vcpus} vCPUs online after {waited:.1f} s",
            size,
        )
    return GuestView(cpus, total)


async def _memory(qmp: Qmp) -> tuple[int, dict[str, Any] | None]:
    summary = await qmp.query("query-memory-size-summary")
    devices = await qmp.query("query-memory-devices")
    device = next(
        (d["data"] for d in devices if d.get("type") == "virtio-mem" and d["data"].get("id") == VIRTIO_MEM),
        None,
    )
    return int(summary["base-memory"]) // MIB, device


def _hotplugged(cpu: dict[str, Any]) -> bool:
    return str(cpu.get("qom-path", "")).startswith(f"/machine/peripheral/{_CPU_ID}")


def _round_up(value: int, step: int) -> int:
    return max(0, math.ceil(value / step) * step)


async def _add_cpus(qmp: Qmp, vcpus: int) -> None:
    """Plugs vCPUs until the VM has `vcpus`. Fewer unplugs none: QEMU 7.2 under TCG was seen to
    crash (SIGSEGV) a second after a vCPU's device_del, so the guest keeps its vCPUs and the
    scope's CPUQuota and the container's cpu.max hold it to what was asked."""
    cpus = await qmp.query("query-hotpluggable-cpus")
    present = [cpu for cpu in cpus if "qom-path" in cpu]
    free = sorted((cpu for cpu in cpus if "qom-path" not in cpu), key=_slot)
    for cpu in free[: max(0, vcpus - len(present))]:
        props = cpu["props"]
        device = (
            f"{_CPU_ID}-{props.get('socket-id', 0)}-{props.get('core-id', 0)}-{props.get('thread-id', 0)}"
        )
        await qmp.query("device_add", {"driver": cpu["type"], "id": device, **props})


def _slot(cpu: dict[str, Any]) -> tuple[int, int, int]:
    props = cpu.get("props", {})
    return (int(props.get("socket-id", 0)), int(props.get("core-id", 0)), int(props.get("thread-id", 0)))


async def _resize_memory(qmp: Qmp, boot: int, memory_mib: int, deadline: float) -> None:
    _, device = await _memory(qmp)
    if device is None:
        return  # check_size kept the boot size
    before = int(device["requested-size"])
    wanted = (memory_mib - boot) * MIB
    if wanted == before and int(device["size"]) == wanted:
        return
    await _set_requested(qmp, wanted)
    size = await _wait_size(qmp, wanted, deadline)
    if size == wanted:
        return
    # What the guest could not give (or take) in time: back to where it was, so nothing changed.
    await _set_requested(qmp, before)
    await _wait_size(qmp, before, time.monotonic() + RESIZE_TIMEOUT)
    verb = "give back" if wanted < before else "take"
    raise GuestRefused(
        f"VM {qmp.vm_id}'s guest could not {verb} {abs(wanted - before) // MIB} MiB of memory in time "
        f"(it reached {boot + size // MIB} MiB of the {memory_mib} MiB asked): its memory stays "
        f"{boot + before // MIB} MiB; memory in use by the guest cannot be unplugged"
    )


async def _set_requested(qmp: Qmp, size: int) -> None:
    await qmp.query("qom-set", {"path": _VIRTIO_MEM_PATH, "property": "requested-size", "value": size})


async def _wait_size(qmp: Qmp, wanted: int, deadline: float) -> int:
    """The device's plugged size once it is `wanted`, or at the deadline. (Setting the requested
    size again to wake a guest that stalled was tried: it restarts the guest's work under way,
    and under a loaded TCG host the guest then made no progress at all.)"""
    while True:
        size = int(await qmp.query("qom-get", {"path": _VIRTIO_MEM_PATH, "property": "size"}))
        if size == wanted or time.monotonic() > deadline:
            return size
        await asyncio.sleep(_POLL)
