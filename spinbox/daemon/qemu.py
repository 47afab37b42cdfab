"""The real backend: QEMU through spinbox.vm, disks through spinbox.storage, NICs through spinbox.net."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

from spinbox import host, net, storage, vm
from spinbox.agent import AgentClient
from spinbox.api.proto import agent_pb2
from spinbox.config import Config, ConfigError
from spinbox.daemon.backend import GuestSetup, Launch, Machine, Network, Rootfs, Spawn
from spinbox.daemon.errors import Failed, GuestUnsettled, InvalidArgument
from spinbox.daemon.options import VmRequest
from spinbox.daemon.templates import TEMPLATE_PORTS, Shape, Template
from spinbox.mounts import MountSpec
from spinbox.vm import control, resize, template
from spinbox.vm.handover import NumberingHandover

log = logging.getLogger(__name__)

# The deadline of one writable layer's stream out of the guest (a large layer under TCG is slow).
EXPORT_TIMEOUT = 1800.0
# ... and the longest it may pause between two pieces (a hung guest is then read by a helper VM).
EXPORT_IDLE_TIMEOUT = 60.0
RESCUE_MEMORY_MIB = 256
RESCUE_SERIAL = "sb-rescue"
RESCUE_SHUTDOWN_TIMEOUT = 10.0
# Seconds a template's guest may take to boot: nobody waits for it, and on a
# busy host a boot under TCG takes minutes rather than the seconds vm.boot_timeout allows.
TEMPLATE_BOOT_TIMEOUT = 900.0
# Where a template's command line is made to name its files, for its identity.
TEMPLATE_IDENTITY_DIR = Path("/run/spinbox/templates/identity")
# The share of timeouts.agent_call the guest may wait for a MountRootfs's hot-plugged
# disks: it gives up first, so that its sentence naming the disk reaches the host.
DEVICE_WAIT_SHARE = 0.8


def with_device_wait(mount: agent_pb2.MountRootfsRequest, agent_call: float) -> agent_pb2.MountRootfsRequest:
    """The request with the guest's wait for its disks derived from timeouts.agent_call."""
    request = agent_pb2.MountRootfsRequest()
    request.CopyFrom(mount)
    request.device_wait_ms = max(1000, int(agent_call * DEVICE_WAIT_SHARE * 1000))
    return request


class QemuBackend:
    def __init__(self, config: Config) -> None:
        self.config = config
        try:
            # Says once in the journal when "auto" falls back to TCG.
            self._accel = vm.choose_accel(config.vm.accel)  # type: ignore[arg-type]
        except vm.VmError as e:
            raise ConfigError(f"vm.accel: {e}") from None
        self._cache: storage.LayerCache | None = None
        self._net: net.NetConfig | None = None

    def accelerator(self) -> str:
        return self._accel

    def check_config(self) -> None:
        """Validate the parts of the configuration other packages read; ConfigError names the key."""
        self._net_config()

    # -- storage ------------------------------------------------------------

    def _layer_cache(self) -> storage.LayerCache:
        if self._cache is None:
            self._cache = storage.LayerCache(root=Path(self.config.storage.layer_cache))
        return self._cache

    async def prepare_rootfs(self, request: VmRequest, work_dir: Path) -> tuple[Rootfs, Sequence[Any], Any]:
        return await self.prepare_added_rootfs(request.container_id, request.rootfs, work_dir, "sb")

    async def prepare_added_rootfs(
        self, container_id: str, mounts: Sequence[MountSpec], work_dir: Path, serial_prefix: str
    ) -> tuple[Rootfs, Sequence[Any], Any]:
        specs = [storage.MountSpec(m.type, m.source, m.target, m.options) for m in mounts]
        os.makedirs(work_dir, mode=0o700, exist_ok=True)
        upper_size = 0 if self.config.storage.tmpfs_upper else self.config.storage.upper_size_mib
        prepared = await storage.prepare_rootfs(
            container_id, specs, work_dir, self._layer_cache(), upper_size, serial_prefix=serial_prefix
        )
        prepared.save()
        disks = [vm.Disk(path=i.path, serial=i.serial, read_only=i.read_only) for i in prepared.images]
        return prepared, disks, prepared.request

    def restore_rootfs(self, work_dir: Path, container_id: str) -> Rootfs | None:
        try:
            return storage.PreparedRootfs.load(work_dir, container_id, self._layer_cache())
        except storage.StorageError:
            return None

    async def collect_storage_leftovers(self) -> None:
        removed = await self._layer_cache().collect()
        if removed:
            log.info("removed %d unused layer image(s) from the cache", len(removed))

    # -- network ------------------------------------------------------------

    def _net_config(self) -> net.NetConfig:
        if self._net is None:
            try:
                self._net = net.NetConfig.from_table(self.config.network_table)
            except net.NetworkError as e:
                raise ConfigError(str(e)) from None
        return self._net

    async def prepare_netns(self, vm_id: str) -> tuple[str, int]:
        return await net.prepare_netns(vm_id, self._net_config())

    async def setup_network(self, request: VmRequest) -> tuple[Network, Sequence[Any]]:
        network = await net.setup_network(request.id, request.netns, self._net_config())
        return network, [vm.Nic(tap_fd=n.tap_fd, mac=n.mac) for n in network.nics]

    async def teardown_network(self, vm_id: str) -> None:
        await net.teardown_network(vm_id, self._net_config())

    async def open_port_forward(self, vm_id: str) -> socket.socket:
        return await net.open_port_forward(vm_id, self._net_config())

    async def collect_network_leftovers(self, live_vm_ids: Sequence[str]) -> None:
        await net.collect_leftovers(list(live_vm_ids), self._net_config())

    # -- QEMU ---------------------------------------------------------------

    def _kernel(self) -> Path:
        kernel = self.config.vm.kernel_path()
        if kernel is None or not kernel.exists():
            raise Failed(
                "no guest kernel: install linux-image-cloud-amd64 "
                "or set vm.kernel in /etc/spinbox/spinbox.toml"
            )
        return kernel

    def _initrd(self) -> Path:
        initrd = self.config.vm.initrd_path
        if not initrd.exists():
            raise Failed(f"no guest image at {initrd}: run spinbox-mkguest (or set vm.initrd)")
        return initrd

    async def launch(self, launch: Launch) -> Machine:
        if launch.template is not None:
            return await self._restore(launch, launch.template)
        request = launch.request
        spec = vm.VmSpec(
            vm_id=request.id,
            kernel=self._kernel(),
            initrd=self._initrd(),
            runtime_dir=launch.runtime_dir,
            vcpus=request.vcpus,
            memory_mib=request.memory_mib,
            max_vcpus=self._max_vcpus(request.vcpus),
            max_memory_mib=self._max_memory(request.memory_mib),
            kernel_args=(*self.config.vm.kernel_args, *request.kernel_args),
            disks=tuple(launch.disks),
            nics=tuple(launch.nics),
            accel=self._accel,  # type: ignore[arg-type]
            hotplug_ports=request.hotplug_ports,
            confine=self.config.vm.confine,
            uid_base=self.config.vm.uid_base,
            virtiofs_fd=launch.virtiofs_fd,
        )
        try:
            machine: Machine = await vm.launch(spec, spawn=launch.spawn)
        except vm.VmError as e:
            raise Failed(str(e)) from None
        return machine

    def _max_vcpus(self, vcpus: int) -> int:
        """What a VM may be resized to: vm.max_vcpus (never less than it boots with)."""
        return max(vcpus, self.config.vm.max_vcpus)

    def _max_memory(self, memory_mib: int) -> int:
        """The boot memory and vm.hotplug_memory_mib, but no more than vm.max_memory_mib and the
        host's memory (never less than the VM boots with)."""
        vm_config = self.config.vm
        top = min(memory_mib + vm_config.hotplug_memory_mib, vm_config.max_memory_mib, host.memory_mib())
        return max(memory_mib, top)

    async def resize(self, machine: Machine, vcpus: int, memory_mib: int) -> dict[str, int]:
        try:
            resized = await resize.resize(cast(vm.VirtualMachine, machine), resize.VmSize(vcpus, memory_mib))
        except resize.SizeOutOfRange as e:
            raise InvalidArgument(str(e)) from None
        except resize.GuestUnsettled as e:
            raise GuestUnsettled(str(e), {"vcpus": e.size.vcpus, "memory-mib": e.size.memory_mib}) from None
        except vm.VmError as e:
            raise Failed(str(e)) from None
        return {
            "vcpus": resized.size.vcpus,
            "memory-mib": resized.size.memory_mib,
            "guest-cpus": resized.guest.cpus,
            "guest-mem-total-kib": resized.guest.mem_total_kib,
        }

    async def size_range(self, machine: Machine) -> tuple[tuple[int, int], tuple[int, int]]:
        try:
            limits = await resize.size_range(cast(vm.VirtualMachine, machine))
        except vm.VmError as e:
            raise Failed(str(e)) from None
        return (limits.boot.vcpus, limits.boot.memory_mib), (limits.max.vcpus, limits.max.memory_mib)

    # -- templates ----------------------------------------------------------

    def _template_spec(
        self, vm_id: str, runtime_dir: Path, vcpus: int, memory_mib: int, ports: int
    ) -> vm.VmSpec:
        """A template's, or a VM restored from it: the same machine but for disks and NICs."""
        return vm.VmSpec(
            vm_id=vm_id,
            kernel=self._kernel(),
            initrd=self._initrd(),
            runtime_dir=runtime_dir,
            vcpus=vcpus,
            memory_mib=memory_mib,
            max_vcpus=self._max_vcpus(vcpus),
            max_memory_mib=self._max_memory(memory_mib),
            kernel_args=self.config.vm.kernel_args,
            accel=self._accel,  # type: ignore[arg-type]
            hotplug_ports=ports,
            disk_slots=self.config.vm.template_disk_slots,
            # With networking off no VM has a NIC: a slot would only show the guest a dead one.
            nic_slots=self.config.vm.template_nic_slots if self._net_config().enabled else 0,
        )

    def template_identity(self, shape: Shape, ports: int) -> dict[str, Any]:
        def stamp(path: Path) -> list[Any]:
            info = path.stat()
            return [str(path.resolve()), info.st_size, info.st_mtime_ns]

        qemu = shutil.which(vm.VmSpec.qemu) or vm.VmSpec.qemu
        # The machine as this spinbox builds it: a spinbox whose QEMU command line
        # differs (another device, another option) cannot restore the template.
        spec = self._template_spec("template", TEMPLATE_IDENTITY_DIR, shape.vcpus, shape.memory_mib, ports)
        # The RAM's and the NIC slots' TAPs' descriptors as NumberingHandover would number them:
        # the same on every call.
        ram = vm.MemoryFile(TEMPLATE_IDENTITY_DIR / "ram", shared=True, fd=999)
        taps = tuple(vm.Nic(tap_fd=900 + i, mac=vm.SLOT_MAC) for i in range(spec.nic_slots))
        spec = dataclasses.replace(spec, memory_file=ram, nics=taps)
        return {
            "kernel": stamp(self._kernel()),
            "initrd": stamp(self._initrd()),
            "qemu": stamp(Path(qemu)),
            "argv": vm.QemuCommand(spec, accel=self._accel).argv(NumberingHandover()),
        }

    async def build_template(
        self, shape: Shape, ports: int, directory: Path, runtime_dir: Path, spawn: Spawn
    ) -> None:
        vm_id = "template-" + directory.name.removesuffix(".partial")
        spec = self._template_spec(vm_id, runtime_dir, shape.vcpus, shape.memory_mib, ports)
        # The NIC slots' peers are TAPs, as a restored VM's are: virtio-net offers the guest its
        # offloads only with one, and the guest keeps what it negotiated at the template's boot.
        try:
            taps, namespace = await asyncio.to_thread(net.open_unconnected_taps, spec.nic_slots)
        except OSError as e:
            raise Failed(f"cannot create the TAPs of the template {vm_id}'s NIC slots: {e}") from None
        try:
            spec = dataclasses.replace(spec, nics=tuple(vm.Nic(tap_fd=fd, mac=vm.SLOT_MAC) for fd in taps))
            timeout = max(self.config.vm.boot_timeout, TEMPLATE_BOOT_TIMEOUT)
            await template.build(spec, template.TemplateFiles(directory), spawn, timeout)
        except vm.VmError as e:
            raise Failed(str(e)) from None
        finally:
            for fd in [*taps, namespace]:
                os.close(fd)

    async def _restore(self, launch: Launch, ready: Template) -> Machine:
        """A VM restored from `ready` whose agent answers; Failed says why not (the VM is gone)."""
        request = launch.request
        spec = self._template_spec(
            request.id, launch.runtime_dir, request.vcpus, request.memory_mib, TEMPLATE_PORTS
        )
        spec = dataclasses.replace(
            spec,
            disks=tuple(launch.disks),
            nics=tuple(launch.nics),
            tcg_cache_mib=self.config.vm.restored_tcg_cache_mib,
        )
        files = template.TemplateFiles(ready.directory)
        machine: vm.VirtualMachine | None = None
        try:
            # A restored guest whose agent does not answer Refresh is broken, and the VM boots
            # cold instead (the caller's choice).
            machine = await template.restore(spec, files, ready.ram, launch.spawn)
        except (vm.VmError, OSError) as e:
            if machine is not None:
                await machine.kill()
            raise Failed(f"restoring VM {request.id} from the template {ready.name} failed: {e}") from None
        except BaseException:
            if machine is not None:
                await machine.kill()
            raise
        return machine

    async def attach(self, runtime_dir: Path) -> Machine:
        return await vm.VirtualMachine.attach(runtime_dir)

    # -- the guest ----------------------------------------------------------

    async def configure_guest(self, machine: Machine, setup: GuestSetup) -> str:
        agent_call = self.config.timeouts.agent_call

        async def configure(agent: AgentClient) -> str:
            # The two are independent and each may wait for its hot-plugged device to appear
            # in the guest: they go together, and the first failure (network's first) is raised
            # once both have ended.
            steps: list[Awaitable[Any]] = []
            if setup.network is not None and len(setup.network.interfaces):
                steps.append(agent.configure_network(setup.network))
            if setup.mount is not None:
                steps.append(agent.mount_rootfs(with_device_wait(setup.mount, agent_call)))
            results = await asyncio.gather(*steps, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            return str(results[-1]) if setup.mount is not None else ""

        return await control.session(machine.control_address, configure, agent_call)

    async def mount_rootfs(self, machine: Machine, mount: Any) -> str:
        agent_call = self.config.timeouts.agent_call

        async def mount_it(agent: AgentClient) -> str:
            return str(await agent.mount_rootfs(with_device_wait(mount, agent_call)))

        return await control.session(machine.control_address, mount_it, agent_call)

    async def quiesce_guest(self, machine: Machine, container_id: str, unmount: bool) -> None:
        async def quiesce(agent: AgentClient) -> None:
            if unmount:
                await agent.unmount_rootfs(container_id)
            else:
                await agent.sync_rootfs(container_id)

        await control.session(machine.control_address, quiesce, self.config.timeouts.agent_call)

    async def export_upper(
        self, machine: Machine, container_id: str, rootfs: Rootfs, final: bool = False
    ) -> None:
        request = agent_pb2.ExportUpperRequest(container_id=container_id, end_container=final)
        await _stream_upper(machine.control_address, request, rootfs)

    async def rescue_upper(
        self, vm_id: str, rootfs: Rootfs, runtime_dir: Path, spawn: Spawn, launched: Callable[[Machine], None]
    ) -> None:
        prepared = cast(storage.PreparedRootfs, rootfs)
        image = prepared.upper_image
        if image is None:
            return
        # The helper VM is the smallest a guest needs: one vCPU, no network, the layer's disk alone.
        request = VmRequest(
            id=vm_id, vcpus=1, memory_mib=RESCUE_MEMORY_MIB, rootfs=(), container_id="", netns=None,
            kernel_args=(), annotations=(),
        )  # fmt: skip
        disk = vm.Disk(path=image, serial=RESCUE_SERIAL, read_only=False)
        machine = await self.launch(Launch(request, runtime_dir, [disk], [], spawn))
        try:
            launched(machine)
            await machine.wait_ready(self.config.vm.boot_timeout)
            device = agent_pb2.BlockDevice(serial=RESCUE_SERIAL, fstype="ext4")
            await _stream_upper(machine.control_address, agent_pb2.ExportUpperRequest(device=device), rootfs)
            await machine.shutdown(RESCUE_SHUTDOWN_TIMEOUT)
        finally:
            await machine.kill()
            await machine.wait_exit()


class ExportStalled(TimeoutError):
    """The guest stopped sending its writable layer."""


async def _with_idle_deadline(stream: AsyncGenerator[bytes, None], idle: float) -> AsyncIterator[bytes]:
    try:
        while True:
            try:
                async with asyncio.timeout(idle):
                    chunk = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise ExportStalled(
                    f"the guest sent nothing of the writable layer for {idle:.0f} s"
                ) from None
            yield chunk
    finally:
        await stream.aclose()


async def _stream_upper(address: str, request: agent_pb2.ExportUpperRequest, rootfs: Rootfs) -> None:
    async def export(agent: AgentClient) -> None:
        stream = agent.export_upper(request, EXPORT_TIMEOUT)
        await rootfs.writeback(_with_idle_deadline(stream, EXPORT_IDLE_TIMEOUT))

    await control.session(address, export)
