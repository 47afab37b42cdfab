"""Resizing a running VM (the VM object's Resize): the machine, its guest and its scope."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from spinbox.daemon import guestrecord
from spinbox.daemon.errors import Failed, GuestUnsettled, InvalidArgument
from spinbox.daemon.systemd import ScopeLimits, SystemdError

if TYPE_CHECKING:
    from spinbox.daemon.manager import Vm, VmManager

log = logging.getLogger(__name__)


async def resize(manager: VmManager, vm: Vm, vcpus: int, memory_mib: int) -> dict[str, Any]:
    """Give `vm` this many vCPUs and MiB of memory; the scope's MemoryMax and CPUQuota follow.

    The scope grows before the machine (QEMU's new memory must fit in it) and shrinks after
    it. 0 keeps the vCPUs or the memory as they are. A size the VM cannot take is
    InvalidArgument and changes nothing; a guest that does not give back what was asked is
    Failed, and the VM and its scope keep the size they had. Success means the guest's own
    kernel counts the new size (/proc/meminfo, its online vCPUs); a guest that does not in
    time is Failed too, but the machine has its new size, and the scope and the VM's record
    follow that.
    """
    async with vm.lock:
        if vm.phase != "running":
            raise Failed(f"VM {vm.id!r} is {vm.phase}, not running")
        resources = vm.state.resources
        vcpus = vcpus or int(resources["vcpus"])
        memory_mib = memory_mib or int(resources["memory-mib"])
        overhead = manager.config.vm.memory_overhead_mib
        old = ScopeLimits.for_vm(int(resources["vcpus"]), int(resources["memory-mib"]), overhead)
        (boot_vcpus, boot_memory), (max_vcpus, max_memory) = await manager.backend.size_range(vm.machine)
        if vcpus > max_vcpus or memory_mib > max_memory:
            raise InvalidArgument(
                f"VM {vm.id!r} can have at most {max_vcpus} vCPUs and {max_memory} MiB of memory "
                f"(vm.max_vcpus, vm.max_memory_mib and the host's memory), not {vcpus} and {memory_mib} MiB"
            )
        if vcpus < boot_vcpus or memory_mib < boot_memory:
            raise InvalidArgument(
                f"VM {vm.id!r} booted with {boot_vcpus} vCPUs and {boot_memory} MiB of memory and cannot "
                f"give back any of those (only what a resize added), so not shrink to {vcpus} and "
                f"{memory_mib} MiB"
            )
        # The largest of the old and new sizes while the machine changes.
        wide = ScopeLimits.for_vm(
            max(vcpus, int(resources["vcpus"])), max(memory_mib, int(resources["memory-mib"])), overhead
        )
        await _set_limits(manager, vm, wide)
        try:
            size = await manager.backend.resize(vm.machine, vcpus, memory_mib)
        except GuestUnsettled as error:
            guestrecord.record_if_missed(vm, error)
            await _follow(manager, vm, vcpus, error.size)
            raise
        except BaseException as error:
            guestrecord.record_if_missed(vm, error)
            await _set_limits(manager, vm, old)
            raise
        await _follow(manager, vm, vcpus, size)
        log.info(
            "VM %s resized to %d vCPUs and %d MiB (the guest sees %d vCPUs and MemTotal %d KiB)",
            vm.id, size["vcpus"], size["memory-mib"], size["guest-cpus"], size["guest-mem-total-kib"],
        )  # fmt: skip
        return {
            **resources,
            "guest-cpus": size["guest-cpus"],
            "guest-mem-total-kib": size["guest-mem-total-kib"],
        }


async def _follow(manager: VmManager, vm: Vm, vcpus: int, size: dict[str, int]) -> None:
    """The scope's limits and the VM's record follow the machine's new size. The CPU time is
    what was asked for, also when the guest keeps more vCPUs (they are never unplugged)."""
    new = ScopeLimits.for_vm(vcpus, size["memory-mib"], manager.config.vm.memory_overhead_mib)
    await _set_limits(manager, vm, new)
    resources = vm.state.resources
    resources.update(
        {
            "vcpus": vcpus,
            "plugged-vcpus": size["vcpus"],
            "memory-mib": size["memory-mib"],
            "memory-max": new.memory_max,
            "cpu-quota-per-sec-usec": new.cpu_quota_per_sec_usec,
            "tasks-max": new.tasks_max,
        }
    )
    vm.state.save(vm.runtime_dir)
    if manager.publisher is not None:
        manager.publisher.changed(vm, {"Resources": resources})


async def _set_limits(manager: VmManager, vm: Vm, limits: ScopeLimits) -> None:
    try:
        await manager.systemd.set_limits(vm.state.scope, limits)
    except SystemdError as e:
        raise Failed(f"VM {vm.id!r}: {e}") from None
