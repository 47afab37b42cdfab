"""The shim's side of spinboxd's D-Bus API (org.spinstack.Spinbox)."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio.message_bus import MessageBus

from spinbox.storage import MountSpec

BUS_NAME = "org.spinstack.Spinbox"
MANAGER_PATH = "/org/spinstack/Spinbox"
MANAGER = "org.spinstack.Spinbox.Manager"
VM = "org.spinstack.Spinbox.VM"
PROPERTIES = "org.freedesktop.DBus.Properties"
ERROR_PREFIX = "org.spinstack.Spinbox.Error."


class SpinboxdError(Exception):
    """A D-Bus error from spinboxd; `kind` is the last part of its name
    (NotFound, InvalidArgument, AlreadyExists, Failed, ...)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.kind = name.removeprefix(ERROR_PREFIX) if name.startswith(ERROR_PREFIX) else name
        self.message = message


@dataclass(frozen=True)
class VmRequest:
    vm_id: str
    container_id: str
    rootfs: tuple[MountSpec, ...] = ()
    vcpus: int | None = None
    memory_mib: int | None = None
    kernel_args: tuple[str, ...] = ()
    netns: str = ""
    annotations: tuple[tuple[str, str], ...] = ()
    hotplug_ports: int = 0

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
        return options


@dataclass(frozen=True)
class VmInfo:
    path: str
    agent_address: str
    rootfs_path: str
    pid: int


VM_ID_MAX = 64
_VM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def vm_id_for(namespace: str, group_id: str) -> str:
    """The VM of a container (or pod) id in a containerd namespace (ids only
    have to be unique within a namespace). spinboxd takes 1-64 letters,
    digits, '_', '.' and '-'; longer ids (nerdctl's are 64 hex digits) keep
    a readable prefix and a digest of the whole."""
    name = f"{namespace}-{group_id}" if namespace else group_id
    if len(name) <= VM_ID_MAX and _VM_ID.fullmatch(name):
        return name
    digest = hashlib.sha256(f"{namespace}/{group_id}".encode()).hexdigest()[:16]
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[: VM_ID_MAX - len(digest) - 1].lstrip("_.-")
    return f"{prefix}-{digest}" if prefix else digest


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, Variant) else value


async def _connect_bus(bus_address: str | None) -> MessageBus:
    try:
        if bus_address:
            return await MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM).connect()
        return await MessageBus(bus_type=BusType.SYSTEM).connect()
    except Exception as error:
        raise SpinboxdError("Unavailable", f"the system bus is not reachable ({error})") from error


class Spinboxd:
    """spinboxd's API on the system bus. A restart of spinboxd keeps the bus
    connection; one of the bus itself is followed by a reconnect."""

    def __init__(self, bus: MessageBus, bus_address: str | None = None) -> None:
        self.bus = bus
        self.bus_address = bus_address

    @classmethod
    async def connect(cls, bus_address: str | None = None) -> Spinboxd:
        return cls(await _connect_bus(bus_address), bus_address)

    def close(self) -> None:
        self.bus.disconnect()

    async def _call(
        self, path: str, interface: str, member: str, signature: str = "", body: Sequence[Any] = ()
    ) -> list[Any]:
        message = Message(
            destination=BUS_NAME,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
        )
        if not self.bus.connected:
            self.bus = await _connect_bus(self.bus_address)
        reply = await self.bus.call(message)
        if reply is None:
            raise SpinboxdError("NoReply", f"spinboxd did not answer {member}")
        if reply.message_type == MessageType.ERROR:
            name = str(reply.error_name or "")
            text = str(reply.body[0]) if reply.body else name or "unknown error"
            raise SpinboxdError(name, text)
        return list(reply.body)

    async def create_vm(self, request: VmRequest) -> VmInfo:
        (path,) = await self._call(
            MANAGER_PATH, MANAGER, "CreateVM", "sa{sv}", [request.vm_id, request.options()]
        )
        return await self.vm_info(path)

    async def vm_info(self, path: str) -> VmInfo:
        (props,) = await self._call(path, PROPERTIES, "GetAll", "s", [VM])
        return VmInfo(
            path=path,
            agent_address=str(_unwrap(props.get("AgentAddress", ""))),
            rootfs_path=str(_unwrap(props.get("RootfsPath", ""))),
            pid=int(_unwrap(props.get("Pid", 0))),
        )

    async def get_vm(self, vm_id: str) -> str | None:
        try:
            (path,) = await self._call(MANAGER_PATH, MANAGER, "GetVM", "s", [vm_id])
        except SpinboxdError as error:
            if error.kind == "NotFound":
                return None
            raise
        return str(path)

    async def prepare_network_namespace(self, vm_id: str) -> tuple[str, int]:
        path, pid = await self._call(MANAGER_PATH, MANAGER, "PrepareNetworkNamespace", "s", [vm_id])
        return str(path), int(pid)

    async def add_rootfs(self, path: str, container_id: str, mounts: Sequence[MountSpec]) -> str:
        """A further container's rootfs in a pod's running VM; its guest path."""
        body = [container_id, [[m.type, m.source, m.target, list(m.options)] for m in mounts]]
        (guest_path,) = await self._call(path, VM, "AddRootfs", "sa(sssas)", body)
        return str(guest_path)

    async def remove_rootfs(self, path: str, container_id: str) -> None:
        await self._call(path, VM, "RemoveRootfs", "s", [container_id])

    async def vm_call(self, path: str, member: str, signature: str = "", body: Sequence[Any] = ()) -> None:
        await self._call(path, VM, member, signature, body)

    async def stop_vm(self, vm_id: str, timeout_ms: int, *, kill: bool = False, wait: float = 120) -> None:
        """Stops (or kills) the VM and returns once spinboxd has released it."""
        path = await self.get_vm(vm_id)
        if path is None:
            return
        try:
            if kill:
                await self.vm_call(path, "Kill")
            else:
                await self.vm_call(path, "Stop", "t", [timeout_ms])
        except SpinboxdError as error:
            if error.kind != "NotFound":
                raise
        deadline = asyncio.get_running_loop().time() + wait
        while await self.get_vm(vm_id) is not None:
            if asyncio.get_running_loop().time() > deadline:
                raise SpinboxdError("Failed", f"VM {vm_id} was not released within {wait:g}s")
            await asyncio.sleep(0.1)
