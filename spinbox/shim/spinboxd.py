"""The shim's side of spinboxd's D-Bus API (org.spinstack.Spinbox)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spinbox.busclient import BusClient, SpinboxdError, plain
from spinbox.busnames import ERROR_PREFIX, MANAGER_IFACE, MANAGER_PATH, VM_IFACE
from spinbox.buswire import Variant
from spinbox.mounts import MountSpec, Volume
from spinbox.vmid import vm_id_for

__all__ = ["Spinboxd", "VmInfo", "VmRequest", "vm_id_for"]

# spinboxd answers CreateVM (and a GetVM of a VM being created) within its own
# timeouts.create (at most 840 s, spinbox.config.CREATE_TIMEOUT_MAX); calls that
# may write a container's files back (Stop, Kill, SyncRootfs, AddRootfs,
# RemoveRootfs) get as long. Other calls have spinbox.busclient.CALL_TIMEOUT.
# These deadlines are for a spinboxd that hangs; each step inside has its own.
CREATE_TIMEOUT = 900.0
# RecordGuestState is done within 30 s (spinbox.daemon.guestrecord.RECORD_TIMEOUT).
RECORD_TIMEOUT = 60.0
# The bus's errors while spinboxd is away: it ended mid-call, or has not taken its name again yet
# (a restarted spinboxd finishes what its predecessor left before it does; activation may time out).
RESTARTING = (
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.TimedOut",
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
)
SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"
# The bus's errors for a call to an object spinboxd no longer exports (its VM was released).
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
OBJECT_GONE = (UNKNOWN_METHOD, "org.freedesktop.DBus.Error.UnknownObject")
# While this file is installed the bus can start spinboxd again; once the package is removed,
# ServiceUnknown means spinboxd is gone for good, and waiting would only hold containerd's call.
ACTIVATION_FILE = "/usr/share/dbus-1/system-services/org.spinstack.Spinbox.service"


def restarting(error: SpinboxdError, activation_file: str | os.PathLike[str]) -> bool:
    """Whether `error` says spinboxd is away for a restart (not gone for good)."""
    if error.name == SERVICE_UNKNOWN:
        return os.path.exists(activation_file)
    return error.name in RESTARTING


def volume_list(volumes: Sequence[Volume]) -> list[list[Any]]:
    return [[v.source, v.read_only, v.recursive] for v in volumes]


@dataclass(frozen=True)
class VmRequest:
    """What CreateVM is asked for: the VM's id, rootfs, size and options."""

    vm_id: str
    container_id: str
    rootfs: tuple[MountSpec, ...] = ()
    vcpus: int | None = None
    memory_mib: int | None = None
    kernel_args: tuple[str, ...] = ()
    netns: str = ""
    annotations: tuple[tuple[str, str], ...] = ()
    hotplug_ports: int = 0
    namespace: str = ""
    share: bool = False
    volumes: tuple[Volume, ...] = ()

    def options(self) -> dict[str, Variant]:
        options: dict[str, Variant] = {
            "container-id": Variant("s", self.container_id),
            "rootfs": Variant(
                "a(sssas)", [[m.type, m.source, m.target, list(m.options)] for m in self.rootfs]
            ),
        }
        if self.vcpus is not None:
            options["vcpus"] = Variant("u", self.vcpus)
        if self.memory_mib is not None:
            options["memory-mib"] = Variant("t", self.memory_mib)
        if self.kernel_args:
            options["kernel-args"] = Variant("as", list(self.kernel_args))
        if self.netns:
            options["netns"] = Variant("s", self.netns)
        if self.annotations:
            options["annotations"] = Variant("a{ss}", dict(self.annotations))
        if self.hotplug_ports:
            options["hotplug-ports"] = Variant("u", self.hotplug_ports)
        if self.namespace:
            options["namespace"] = Variant("s", self.namespace)
        if self.share or self.volumes:
            options["share"] = Variant("b", True)
        if self.volumes:
            options["volumes"] = Variant("a(sbb)", volume_list(self.volumes))
        return options


@dataclass(frozen=True)
class VmInfo:
    """A VM spinboxd runs: its bus object, agent address, rootfs path and QEMU's pid."""

    path: str
    agent_address: str
    rootfs_path: str
    pid: int


class Spinboxd:
    """spinboxd's API on the system bus, as the shim uses it."""

    def __init__(self, client: BusClient, activation_file: str | os.PathLike[str] = ACTIVATION_FILE) -> None:
        self.activation_file = activation_file
        self.client = client

    @classmethod
    async def connect(cls, bus_address: str | None = None) -> Spinboxd:
        return cls(await BusClient.connect(bus_address))

    def close(self) -> None:
        self.client.close()

    async def create_vm(self, request: VmRequest) -> VmInfo:
        (path,) = await self.client.call(
            MANAGER_PATH,
            MANAGER_IFACE,
            "CreateVM",
            "sa{sv}",
            [request.vm_id, request.options()],
            CREATE_TIMEOUT,
        )
        return await self.vm_info(path)

    async def vm_info(self, path: str) -> VmInfo:
        props = await self.client.properties(path, VM_IFACE)
        return VmInfo(
            path=path,
            agent_address=str(props.get("AgentAddress", "")),
            rootfs_path=str(props.get("RootfsPath", "")),
            pid=int(props.get("Pid", 0)),
        )

    async def get_vm(self, vm_id: str) -> str | None:
        try:
            (path,) = await self.client.call(
                MANAGER_PATH, MANAGER_IFACE, "GetVM", "s", [vm_id], CREATE_TIMEOUT
            )
        except SpinboxdError as error:
            if error.kind == "NotFound":
                return None
            raise
        return str(path)

    async def vm_ending(self, vm_id: str, wait: float) -> tuple[int, str, str]:
        """How the VM ended (waiting up to `wait` s): its container processes' exit status, why,
        and what ended it as a word ("oom-kill": the kernel's OOM killer; "" from a spinboxd
        older than VMEndingCause)."""
        body = [vm_id, int(wait * 1000)]
        try:
            status, reason, cause = await self.client.call(
                MANAGER_PATH, MANAGER_IFACE, "VMEndingCause", "su", body, wait + 30
            )
        except SpinboxdError as error:
            if error.name != UNKNOWN_METHOD:
                raise
            status, reason = await self.client.call(
                MANAGER_PATH, MANAGER_IFACE, "VMEnding", "su", body, wait + 30
            )
            cause = ""
        return int(status), str(reason), str(cause)

    async def prepare_network_namespace(self, vm_id: str) -> tuple[str, int]:
        path, pid = await self.client.call(
            MANAGER_PATH, MANAGER_IFACE, "PrepareNetworkNamespace", "s", [vm_id]
        )
        return str(path), int(pid)

    async def add_rootfs(self, path: str, container_id: str, mounts: Sequence[MountSpec]) -> str:
        """A further container's rootfs in a pod's running VM; its guest path."""
        body = [container_id, [[m.type, m.source, m.target, list(m.options)] for m in mounts]]
        (guest_path,) = await self.client.call(path, VM_IFACE, "AddRootfs", "sa(sssas)", body, CREATE_TIMEOUT)
        return str(guest_path)

    async def vm_resources(self, path: str) -> dict[str, Any]:
        """The VM's Resources property (its size, boot size and scope limits)."""
        props = await self.client.properties(path, VM_IFACE)
        resources = props.get("Resources") or {}
        return dict(resources) if isinstance(resources, dict) else {}

    async def resize_vm(self, path: str, vcpus: int, memory_mib: int) -> dict[str, Any]:
        (resources,) = await self.client.call(
            path, VM_IFACE, "Resize", "ut", [vcpus, memory_mib], CREATE_TIMEOUT
        )
        return dict(plain(resources))

    async def remove_rootfs(self, path: str, container_id: str) -> None:
        """Removes a further container's rootfs, and its volumes. NotFound once the VM itself is
        gone (its release wrote every rootfs back first, or kept and named what it could not)."""
        try:
            await self.client.call(path, VM_IFACE, "RemoveRootfs", "s", [container_id], CREATE_TIMEOUT)
        except SpinboxdError as error:
            if error.name in OBJECT_GONE and path not in await self.list_vms():
                raise SpinboxdError(
                    f"{ERROR_PREFIX}NotFound",
                    f"VM {path} was released before {container_id}'s rootfs was removed",
                ) from None
            raise

    async def open_port_forward(self, path: str) -> int:
        """The listening socket's fd that spinboxd opened in the VM's network namespace for
        port-forward, with the rule that redirects the namespace's connections to 127.0.0.1 to it."""
        return await self.client.call_fd(path, VM_IFACE, "OpenPortForward")

    async def list_vms(self) -> list[str]:
        (paths,) = await self.client.call(MANAGER_PATH, MANAGER_IFACE, "ListVMs")
        return [str(p) for p in paths]

    async def add_volumes(self, path: str, container_id: str, volumes: Sequence[Volume]) -> None:
        """A further container's volumes in a pod's running VM's share."""
        await self.client.call(
            path, VM_IFACE, "AddVolumes", "sa(sbb)", [container_id, volume_list(volumes)], CREATE_TIMEOUT
        )

    async def record_guest_state(self, path: str, reason: str) -> None:
        """Has spinboxd write where the VM's guest is into the VM's journal (done within 30 s)."""
        await self.client.call(path, VM_IFACE, "RecordGuestState", "s", [reason], RECORD_TIMEOUT)

    async def vm_call(self, path: str, member: str, signature: str = "", body: Sequence[Any] = ()) -> None:
        await self.client.call(path, VM_IFACE, member, signature, body, CREATE_TIMEOUT)

    async def stop_vm(self, vm_id: str, timeout_ms: int, *, kill: bool = False, wait: float = 120) -> None:
        """Stops (or kills) the VM and returns once spinboxd has released it."""
        deadline = asyncio.get_running_loop().time() + wait
        path = await self._get_vm_across_restarts(vm_id, deadline)
        if path is None:
            return
        try:
            if kill:
                await self.vm_call(path, "Kill")
            else:
                await self.vm_call(path, "Stop", "t", [timeout_ms])
        except SpinboxdError as error:
            # spinboxd ended mid-call: the one systemd starts again finishes the stop.
            if error.kind != "NotFound" and not restarting(error, self.activation_file):
                raise
        while await self._get_vm_across_restarts(vm_id, deadline) is not None:
            if asyncio.get_running_loop().time() > deadline:
                raise SpinboxdError("Failed", f"VM {vm_id} was not released within {wait:g}s")
            await asyncio.sleep(0.1)

    async def _get_vm_across_restarts(self, vm_id: str, deadline: float) -> str | None:
        """get_vm, asked again while spinboxd is away (restarting) until the deadline."""
        while True:
            try:
                return await self.get_vm(vm_id)
            except SpinboxdError as error:
                if (
                    not restarting(error, self.activation_file)
                    or asyncio.get_running_loop().time() > deadline
                ):
                    raise
            await asyncio.sleep(0.5)
