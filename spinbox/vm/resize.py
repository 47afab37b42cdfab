"""Resizing a running VM: vCPUs by CPU hotplug, memory by its virtio-mem device.

A VM is resizable between the size it booted with and the maximum its command line
reserved (VmSpec.max_vcpus, max_memory_mib: `-smp maxcpus`, the virtio-mem region).
Everything here is read back from QEMU, so a re-adopted VM resizes like a new one.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from spinbox.vm.errors import VmError
from spinbox.vm.qemu import VIRTIO_MEM

MIB = 1024 * 1024
# How long the guest may take to plug or give back memory, and to let go of a vCPU.
RESIZE_TIMEOUT = 60.0
_POLL = 0.05
_VIRTIO_MEM_PATH = f"/machine/peripheral/{VIRTIO_MEM}"
# Hot-plugged vCPUs are QEMU devices with ids of this prefix (their boot siblings have none).
_CPU_ID = "vcpu"


class Qmp(Protocol):
    """What a resize needs of a VM (spinbox.vm.VirtualMachine)."""

    @property
    def vm_id(self) -> str: ...

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


async def resize(qmp: Qmp, target: VmSize, timeout: float = RESIZE_TIMEOUT) -> VmSize:  # noqa: ASYNC109
    """Give the VM `target`'s vCPUs and memory; returns the size it has then.

    The guest onlines a plugged vCPU only when told to (vminitd's OnlineCpus): a resize that
    adds vCPUs is followed by that call.
    """
    limits = await size_range(qmp)
    target = check_size(qmp.vm_id, limits, target)
    deadline = time.monotonic() + timeout
    await _add_cpus(qmp, target.vcpus)
    await _resize_memory(qmp, limits.boot.memory_mib, target.memory_mib, deadline)
    return await current_size(qmp)


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
