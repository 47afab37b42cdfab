"""The real backend: QEMU through spinbox.vm, disks through spinbox.storage, NICs through spinbox.net."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spinbox.config import Config
from spinbox.daemon.backend import GuestSetup, Machine, Rootfs, Spawn
from spinbox.daemon.errors import Failed
from spinbox.daemon.host import choose_accelerator
from spinbox.daemon.options import VmRequest

log = logging.getLogger(__name__)


def _module(name: str) -> Any:
    # The VM, storage and network packages are imported when first used.
    return importlib.import_module(name)


class QemuBackend:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._accel, reason = choose_accelerator(config.vm.accel)
        if self._accel == "tcg" and config.vm.accel != "tcg":
            log.warning("%s", reason)
        self._cache: Any = None

    def accelerator(self) -> str:
        return self._accel

    # -- storage ------------------------------------------------------------

    async def prepare_rootfs(self, request: VmRequest, work_dir: Path) -> tuple[Rootfs, Sequence[Any], Any]:
        storage = _module("spinbox.storage")
        Disk = _module("spinbox.vm").Disk

        if self._cache is None:
            self._cache = storage.LayerCache(root=Path(self.config.storage.layer_cache))
        mounts = [storage.MountSpec(m.type, m.source, m.target, m.options) for m in request.rootfs]
        os.makedirs(work_dir, exist_ok=True)
        prepared = await storage.prepare_rootfs(
            request.container_id, mounts, work_dir, self._cache, self.config.storage.upper_size_mib
        )
        disks = [Disk(path=i.path, serial=i.serial, read_only=i.read_only) for i in prepared.images]
        return prepared, disks, prepared.request

    # -- network ------------------------------------------------------------

    async def setup_network(self, request: VmRequest) -> tuple[Sequence[Any], Any]:
        net = _module("spinbox.net")

        network = await net.setup_network(request.id, request.netns, self.config.network)
        return list(network.nics), network.guest

    async def teardown_network(self, vm_id: str) -> None:
        net = _module("spinbox.net")

        await net.teardown_network(vm_id)

    async def collect_network_leftovers(self, live_vm_ids: Sequence[str]) -> None:
        net = _module("spinbox.net")

        await net.collect_leftovers(list(live_vm_ids))

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

    async def launch(
        self,
        request: VmRequest,
        runtime_dir: Path,
        disks: Sequence[Any],
        nics: Sequence[Any],
        spawn: Spawn,
    ) -> Machine:
        vm = _module("spinbox.vm")

        spec = vm.VmSpec(
            vm_id=request.id,
            vcpus=request.vcpus,
            memory_mib=request.memory_mib,
            kernel=self._kernel(),
            initrd=self._initrd(),
            kernel_args=(*self.config.vm.kernel_args, *request.kernel_args),
            disks=tuple(disks),
            nics=tuple(nics),
            accel=self._accel,
            runtime_dir=runtime_dir,
        )
        machine: Machine = await vm.launch(spec, spawn=spawn)
        return machine

    async def attach(self, runtime_dir: Path) -> Machine:
        vm = _module("spinbox.vm")

        machine: Machine = await vm.VirtualMachine.attach(runtime_dir)
        return machine

    # -- the guest ----------------------------------------------------------

    async def configure_guest(self, machine: Machine, setup: GuestSetup) -> str:
        AgentClient = _module("spinbox.vm.agent").AgentClient

        agent = await AgentClient.connect(machine.control_address)
        try:
            if setup.network is not None:
                await agent.configure_network(setup.network)
            if setup.mount is not None:
                response = await agent.mount_rootfs(setup.mount)
                return str(response.path)
            return ""
        finally:
            await agent.close()

    async def quiesce_guest(self, machine: Machine, container_id: str, unmount: bool) -> None:
        from spinbox.api.proto import agent_pb2

        AgentClient = _module("spinbox.vm.agent").AgentClient

        agent = await AgentClient.connect(machine.control_address)
        try:
            if unmount:
                await agent.unmount_rootfs(agent_pb2.UnmountRootfsRequest(container_id=container_id))
            else:
                await agent.sync_rootfs(agent_pb2.SyncRootfsRequest(container_id=container_id))
        finally:
            await agent.close()
