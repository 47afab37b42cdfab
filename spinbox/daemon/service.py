"""org.spinstack.Spinbox on the system bus: the Manager object and one object per VM.

The interfaces' introspection is the documented XML under dbus/ (installed to
/usr/share/dbus-1/interfaces/); tests check that the code below implements
exactly that XML.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from dbus_fast import Variant
from dbus_fast import introspection as intr
from dbus_fast.aio.message_bus import MessageBus
from dbus_fast.constants import PropertyAccess
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface, dbus_property, method, signal

import spinbox
from spinbox.busnames import MANAGER_IFACE, MANAGER_PATH, VM_IFACE
from spinbox.config import Config
from spinbox.daemon.auth import Authorizer, SpecGuard, authorize, record_caller
from spinbox.daemon.errors import Failed
from spinbox.daemon.manager import Vm, VmManager
from spinbox.daemon.options import parse_mounts, parse_request, parse_volumes

log = logging.getLogger(__name__)

# Properties that carry what a container's spec said: root only, or polkit's read-spec action.
PRIVATE = {VM_IFACE: {"Resources"}}
XML_DIRS = (
    Path(__file__).resolve().parents[2] / "dbus",  # running from the source tree
    Path("/usr/share/dbus-1/interfaces"),
)

T = TypeVar("T")


def interface_xml(name: str) -> intr.Interface | None:
    """The documented interface `name` from its XML file, if installed."""
    for directory in XML_DIRS:
        path = directory / f"{name}.xml"
        if path.exists():
            root = ET.parse(path).getroot()
            for element in root.iter("interface"):
                if element.get("name") == name:
                    return intr.Interface.from_xml(element)
    return None


async def _answer(what: str, call: Awaitable[T]) -> T:
    """Named errors pass through; anything else becomes Failed with a sentence, never a traceback."""
    try:
        return await call
    except DBusError:
        raise
    except Exception as e:
        log.exception("%s failed", what)
        raise Failed(f"{what} failed: {e}") from None


class DocumentedInterface(ServiceInterface):
    """Serves its introspection from the XML under dbus/ when that is present."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._documented = interface_xml(name)

    def introspect(self) -> intr.Interface:
        return self._documented or super().introspect()


def _variants(values: dict[str, Any]) -> dict[str, Variant]:
    out = {}
    for key, value in values.items():
        if isinstance(value, bool):
            out[key] = Variant("b", value)
        elif isinstance(value, int):
            out[key] = Variant("u" if key in ("vcpus", "boot-vcpus", "guest-cpus") else "t", value)
        elif isinstance(value, float):
            out[key] = Variant("d", value)
        elif isinstance(value, str):
            out[key] = Variant("s", value)
        elif isinstance(value, dict):
            out[key] = Variant("a{ss}", {str(k): str(v) for k, v in value.items()})
        elif isinstance(value, list | tuple):
            out[key] = Variant("as", [str(v) for v in value])
    return out


class VMInterface(DocumentedInterface):
    """Every method changes state: root only, or whom polkit authorizes."""

    def __init__(self, manager: VmManager, vm: Vm, authorizer: Authorizer) -> None:
        super().__init__(VM_IFACE)
        self.manager = manager
        self.vm = vm
        self.authorizer = authorizer

    @method()
    async def Stop(self, timeout_ms: "t"):
        await authorize(self.authorizer, "Stop")
        await _answer(f"stopping VM {self.vm.id!r}", self.manager.stop(self.vm, timeout_ms / 1000))

    @method()
    async def Kill(self):
        await authorize(self.authorizer, "Kill")
        await _answer(f"killing VM {self.vm.id!r}", self.manager.stop(self.vm, 0, force=True))

    @method()
    async def Pause(self):
        await authorize(self.authorizer, "Pause")
        await _answer(f"pausing VM {self.vm.id!r}", self.manager.pause(self.vm))

    @method()
    async def Resume(self):
        await authorize(self.authorizer, "Resume")
        await _answer(f"resuming VM {self.vm.id!r}", self.manager.resume(self.vm))

    @method()
    async def Resize(self, vcpus: "u", memory_mib: "t") -> "a{sv}":
        await authorize(self.authorizer, "Resize")
        resized = await _answer(
            f"resizing VM {self.vm.id!r} to {vcpus} vCPUs and {memory_mib} MiB",
            self.manager.resize(self.vm, vcpus, memory_mib),
        )
        return _variants(resized)

    @method()
    async def RecordGuestState(self, reason: "s"):
        await authorize(self.authorizer, "RecordGuestState")
        await _answer(
            f"recording where VM {self.vm.id!r}'s guest is", self.manager.record_guest_state(self.vm, reason)
        )

    @method()
    async def SyncRootfs(self):
        await authorize(self.authorizer, "SyncRootfs")
        await _answer(f"syncing the rootfs of VM {self.vm.id!r}", self.manager.sync_rootfs(self.vm))

    @method()
    async def AddRootfs(self, container_id: "s", mounts: "a(sssas)") -> "s":
        await authorize(self.authorizer, "AddRootfs")

        async def add() -> str:
            parsed = parse_mounts(mounts, f"the rootfs of {container_id!r}")
            return await self.manager.add_rootfs(self.vm, container_id, parsed)

        return await _answer(f"adding the rootfs of {container_id!r} to VM {self.vm.id!r}", add())

    @method()
    async def AddVolumes(self, container_id: "s", volumes: "a(sbb)"):
        async def add() -> None:
            parsed = parse_volumes(volumes, f"the volumes of {container_id!r}")
            await self.manager.add_volumes(self.vm, container_id, parsed)

        await _answer(f"adding the volumes of {container_id!r} to VM {self.vm.id!r}", add())

    @method()
    async def RemoveRootfs(self, container_id: "s"):
        await authorize(self.authorizer, "RemoveRootfs")
        await _answer(
            f"removing the rootfs of {container_id!r} from VM {self.vm.id!r}",
            self.manager.remove_rootfs(self.vm, container_id),
        )

    @method()
    async def OpenPortForward(self) -> "h":
        await authorize(self.authorizer, "OpenPortForward")
        sock = await _answer(
            f"opening port-forward into VM {self.vm.id!r}", self.manager.open_port_forward(self.vm)
        )
        # dbus-fast sends the fd after this returns: spinboxd's copy stays open until the release.
        return sock.fileno()

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.vm.id

    @dbus_property(access=PropertyAccess.READ)
    def Namespace(self) -> "s":
        return self.vm.state.namespace

    @dbus_property(access=PropertyAccess.READ)
    def ContainerId(self) -> "s":
        return self.vm.state.container_id

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self.vm.phase

    @dbus_property(access=PropertyAccess.READ)
    def Pid(self) -> "u":
        return self.vm.state.pid

    @dbus_property(access=PropertyAccess.READ)
    def Scope(self) -> "s":
        return self.vm.state.scope

    @dbus_property(access=PropertyAccess.READ)
    def AgentAddress(self) -> "s":
        return self.vm.state.agent_address

    @dbus_property(access=PropertyAccess.READ)
    def RootfsPath(self) -> "s":
        return self.vm.state.rootfs_path

    @dbus_property(access=PropertyAccess.READ)
    def Addresses(self) -> "as":
        return list(self.vm.state.addresses)

    @dbus_property(access=PropertyAccess.READ)
    def Resources(self) -> "a{sv}":
        return _variants(self.vm.state.resources)

    @dbus_property(access=PropertyAccess.READ)
    def BootTimeline(self) -> "a{sd}":
        return {k: float(v) for k, v in self.vm.state.timeline.items()}


class ManagerInterface(DocumentedInterface):
    def __init__(self, manager: VmManager, config: Config, accelerator: str, authorizer: Authorizer) -> None:
        super().__init__(MANAGER_IFACE)
        self.manager = manager
        self.config = config
        self.accelerator = accelerator
        self.authorizer = authorizer  # for CreateVM and PrepareNetworkNamespace

    @method()
    async def CreateVM(self, id: "s", options: "a{sv}") -> "o":
        await authorize(self.authorizer, "CreateVM")

        async def create() -> str:
            request = parse_request(id, options, self.config.vm)
            vm = await self.manager.create(request)
            return vm.path

        return await _answer(f"creating VM {id!r}", create())

    @method()
    async def GetVM(self, id: "s") -> "o":
        # A VM being created is answered once its creation has ended.
        return (await self.manager.settled(id)).path

    @method()
    async def VMEnding(self, id: "s", timeout_ms: "u") -> "us":
        ending = await _answer(f"the end of VM {id!r}", self.manager.ending(id, timeout_ms / 1000))
        return [ending.container_status, ending.reason]

    @method()
    async def VMEndingCause(self, id: "s", timeout_ms: "u") -> "uss":
        ending = await _answer(f"the end of VM {id!r}", self.manager.ending(id, timeout_ms / 1000))
        return [ending.container_status, ending.reason, ending.cause]

    @method()
    def ListVMs(self) -> "ao":
        return sorted(vm.path for vm in self.manager.vms.values())

    @method()
    async def PrepareNetworkNamespace(self, id: "s") -> "su":
        await authorize(self.authorizer, "PrepareNetworkNamespace")
        path, pid = await _answer(f"preparing a network namespace for {id!r}", self.manager.prepare_netns(id))
        return [path, pid]

    @signal()
    def VMAdded(self, id: str, path: str) -> "so":
        return [id, path]

    @signal()
    def VMRemoved(self, id: str, path: str) -> "so":
        return [id, path]

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return spinbox.__version__

    @dbus_property(access=PropertyAccess.READ)
    def Accelerator(self) -> "s":
        return self.accelerator

    @dbus_property(access=PropertyAccess.READ)
    def Leftovers(self) -> "as":
        cleaning = [
            f"VM {vm_id}: left by a previous spinboxd; being cleaned up (its writable layers written back)"
            for vm_id in sorted(self.manager.recovering)
        ]
        return self.manager.kept.listed() + cleaning

    @dbus_property(access=PropertyAccess.READ)
    def Defaults(self) -> "a{sv}":
        vm = self.config.vm
        return {
            "vcpus": Variant("u", vm.vcpus),
            "memory-mib": Variant("t", vm.memory_mib),
            "max-vcpus": Variant("u", vm.max_vcpus),
            "max-memory-mib": Variant("t", vm.max_memory_mib),
            "kernel": Variant("s", str(vm.kernel_path() or "")),
            "initrd": Variant("s", vm.initrd),
            "accel": Variant("s", vm.accel),
        }


class BusPublisher:
    """Exports VM objects on the bus and announces them (manager.Publisher)."""

    def __init__(self, bus: MessageBus, manager: VmManager, manager_iface: ManagerInterface) -> None:
        self.bus = bus
        self.manager = manager
        self.manager_iface = manager_iface
        self._interfaces: dict[str, VMInterface] = {}

    def publish(self, vm: Vm) -> None:
        interface = VMInterface(self.manager, vm, self.manager_iface.authorizer)
        self._interfaces[vm.id] = interface
        self.bus.export(vm.path, interface)
        self.manager_iface.VMAdded(vm.id, vm.path)

    def unpublish(self, vm: Vm) -> None:
        interface = self._interfaces.pop(vm.id, None)
        if interface is not None:
            self.bus.unexport(vm.path, interface)
            self.manager_iface.VMRemoved(vm.id, vm.path)

    def changed(self, vm: Vm, properties: dict[str, Any]) -> None:
        interface = self._interfaces.get(vm.id)
        if interface is not None:
            if "Resources" in properties:
                properties = {**properties, "Resources": _variants(properties["Resources"])}
            interface.emit_properties_changed(properties)


def export_manager(bus: MessageBus, manager: VmManager, config: Config, accelerator: str) -> ManagerInterface:
    authorizer = Authorizer(bus)
    bus.add_message_handler(record_caller)
    bus.add_message_handler(SpecGuard(bus, authorizer, PRIVATE))
    interface = ManagerInterface(manager, config, accelerator, authorizer)
    bus.export(MANAGER_PATH, interface)
    manager.publisher = BusPublisher(bus, manager, interface)
    return interface
