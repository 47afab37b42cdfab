"""A container's VM follows its resources: `ctr task update` and the CRI's
UpdateContainerResources resize it, and a pod's VM grows as containers join it.

A container in a VM of its own needs what its limits need (spinbox.shim.sizing),
never less than its VM booted with. A pod's VM needs what it booted with (the
sandbox's size) plus each further container's CPU quota and memory limit. Memory
grows before a container's cgroup limit is raised, and is given back only after it
was lowered; a resize that fails puts the container's limits back as they were.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from spinbox.busclient import SpinboxdError
from spinbox.shim.container import Container, VmManager
from spinbox.shim.errors import invalid, spinboxd_error
from spinbox.shim.sizing import MIB, memory_from_resources, vcpus_from_resources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VmSize:
    """A VM's vCPUs and memory."""

    vcpus: int
    memory_mib: int


def resources_of(spec: dict[str, Any]) -> dict[str, Any]:
    resources = (spec.get("linux") or {}).get("resources") or {}
    return resources if isinstance(resources, dict) else {}


def parse_resources(value: bytes) -> dict[str, Any]:
    """Update's LinuxResources (JSON), or InvalidArgument."""
    try:
        resources = json.loads(value)
    except ValueError as e:
        raise invalid(f"Update's resources are not JSON (OCI LinuxResources): {e}") from None
    if not isinstance(resources, dict):
        raise invalid("Update's resources are not a JSON object (OCI LinuxResources)")
    for key in ("cpu", "memory"):
        if not isinstance(resources.get(key) or {}, dict):
            raise invalid(f"Update's resources: {key!r} is not an object")
    return resources


def own_vm_size(boot: VmSize, resources: dict[str, Any]) -> VmSize:
    """The size of a container's own VM for these limits."""
    vcpus = vcpus_from_resources(resources.get("cpu") or {}) or 0
    memory = memory_from_resources(resources.get("memory") or {}) or 0
    return VmSize(max(boot.vcpus, vcpus), max(boot.memory_mib, memory))


def member_demand(resources: dict[str, Any]) -> VmSize:
    """What a pod's further container adds to its VM: its CPU quota and memory limit."""
    vcpus = vcpus_from_resources(resources.get("cpu") or {}) or 0
    limit = (resources.get("memory") or {}).get("limit")
    memory = math.ceil(limit / MIB) if isinstance(limit, int) and limit > 0 else 0
    return VmSize(vcpus, memory)


def pod_vm_size(boot: VmSize, members: list[dict[str, Any]]) -> VmSize:
    demands = [member_demand(resources) for resources in members]
    return VmSize(
        boot.vcpus + sum(d.vcpus for d in demands), boot.memory_mib + sum(d.memory_mib for d in demands)
    )


async def vm_sizes(spinboxd: VmManager, path: str) -> tuple[VmSize, VmSize]:
    """The VM's boot and current size (its Resources)."""
    resources = await spinboxd.vm_resources(path)
    boot = VmSize(int(resources.get("boot-vcpus", 0)), int(resources.get("boot-memory-mib", 0)))
    now = VmSize(int(resources["vcpus"]), int(resources["memory-mib"]))
    return boot, now


async def resize_vm(spinboxd: VmManager, path: str, size: VmSize, what: str) -> None:
    try:
        await spinboxd.resize_vm(path, size.vcpus, size.memory_mib)
    except SpinboxdError as error:
        raise spinboxd_error(error, what) from None


async def update(spinboxd: VmManager, container: Container, members: list[Container], value: bytes) -> None:
    """Update's work: the VM's size and the container's cgroup limits (crun update in the guest).

    `members`: the further containers of the pod whose VM this is (`container` is one of
    them, or the pod's sandbox); empty for a VM of its own.
    """
    resources = parse_resources(value)
    old_value = json.dumps(resources_of(container.spec)).encode()
    try:
        boot, now = await vm_sizes(spinboxd, container.vm.path)
    except SpinboxdError as error:
        raise spinboxd_error(error, f"cannot read the size of the VM of {container.id!r}") from None
    if not (boot.vcpus and boot.memory_mib):  # a VM from before resizing existed: its size stays
        target = now
    elif container.sandbox:
        others = [resources_of(m.spec) for m in members if m.id != container.id]
        target = pod_vm_size(boot, [*others, resources])
    elif members:  # the sandbox of a pod: its VM is sized by the pod's containers
        target = pod_vm_size(boot, [resources_of(m.spec) for m in members])
    else:
        target = own_vm_size(boot, resources)
    what = f"cannot resize the VM of {container.id!r} to {target.vcpus} vCPUs and {target.memory_mib} MiB"
    if target.memory_mib < now.memory_mib or target.vcpus < now.vcpus:
        # Lowered limits first, so that the guest can give back what the container let go of.
        await container.agent.update_resources(container.id, value)
        try:
            await resize_vm(spinboxd, container.vm.path, target, what)
        except BaseException:
            await container.agent.update_resources(container.id, old_value)
            raise
    else:
        if target != now:
            await resize_vm(spinboxd, container.vm.path, target, what)
        await container.agent.update_resources(container.id, value)
    container.spec.setdefault("linux", {})["resources"] = resources
    log.info(
        "%s: resources updated, its VM has %d vCPUs and %d MiB", container.id, target.vcpus, target.memory_mib
    )


async def grow_pod(spinboxd: VmManager, pod: Container, members: list[Container]) -> None:
    """After a container joined the pod: its VM gets room for it (a failure is logged: the
    container runs, with less room than its limits allow)."""
    try:
        boot, now = await vm_sizes(spinboxd, pod.vm.path)
        if not (boot.vcpus and boot.memory_mib):
            return
        target = pod_vm_size(boot, [resources_of(m.spec) for m in members])
        target = VmSize(max(target.vcpus, now.vcpus), max(target.memory_mib, now.memory_mib))
        if target != now:
            await spinboxd.resize_vm(pod.vm.path, target.vcpus, target.memory_mib)
    except SpinboxdError as error:
        log.error("the VM of pod %s could not grow for its containers: %s", pod.id, error.message)
