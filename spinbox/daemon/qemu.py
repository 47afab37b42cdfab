"""The real backend: QEMU through spinbox.vm, disks through spinbox.storage, NICs through spinbox.net."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spinbox.config import Config, ConfigError
from spinbox.daemon.backend import GuestSetup, Machine, Network, Rootfs, Spawn
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
        self._net: Any = None

    def accelerator(self) -> str:
        return self._accel

    def check_config(self) -> None:
        """Validate the parts of the configuration other packages read; ConfigError names the key."""
        if importlib.util.find_spec("spinbox.net") is not None:
            self._net_config()

    # -- storage ------------------------------------------------------------

    def _layer_cache(self) -> Any:
        if self._cache is None:
            storage = _module("spinbox.storage")
            self._cache = storage.LayerCache(root=Path(self.config.storage.layer_cache))
        return self._cache

    async def prepare_rootfs(self, request: VmRequest, work_dir: Path) -> tuple[Rootfs, Sequence[Any], Any]:
        storage = _module("spinbox.storage")
        disk = _module("spinbox.vm").Disk
        mounts = [storage.MountSpec(m.type, m.source, m.target, m.options) for m in request.rootfs]
        os.makedirs(work_dir, mode=0o700, exist_ok=True)
        upper_size = 0 if self.config.storage.tmpfs_upper else self.config.storage.upper_size_mib
        prepared = await storage.prepare_rootfs(
            request.container_id, mounts, work_dir, self._layer_cache(), upper_size
        )
        prepared.save()
        disks = [disk(path=i.path, serial=i.serial, read_only=i.read_only) for i in prepared.images]
        return prepared, disks, prepared.request

    def restore_rootfs(self, work_dir: Path, container_id: str) -> Rootfs | None:
        storage = _module("spinbox.storage")
        try:
            rootfs: Rootfs = storage.PreparedRootfs.load(work_dir, container_id, self._layer_cache())
        except storage.StorageError:
            return None
        return rootfs

    # -- network ------------------------------------------------------------

    def _net_config(self) -> Any:
        if self._net is None:
            net = _module("spinbox.net")
            try:
                self._net = net.NetConfig.from_table(self.config.network_table)
            except net.NetworkError as e:
                raise ConfigError(str(e)) from None
        return self._net

    async def prepare_netns(self, vm_id: str) -> tuple[str, int]:
        path, pid = await _module("spinbox.net").prepare_netns(vm_id, self._net_config())
        return str(path), int(pid)

    async def setup_network(self, request: VmRequest) -> tuple[Network, Sequence[Any]]:
        nic = _module("spinbox.vm").Nic
        network = await _module("spinbox.net").setup_network(request.id, request.netns, self._net_config())
        return network, [nic(tap_fd=n.tap_fd, mac=n.mac) for n in network.nics]

    async def teardown_network(self, vm_id: str) -> None:
        await _module("spinbox.net").teardown_network(vm_id, self._net_config())

    async def collect_network_leftovers(self, live_vm_ids: Sequence[str]) -> None:
        await _module("spinbox.net").collect_leftovers(list(live_vm_ids), self._net_config())

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
            kernel=self._kernel(),
            initrd=self._initrd(),
            runtime_dir=runtime_dir,
            vcpus=request.vcpus,
            memory_mib=request.memory_mib,
            kernel_args=(*self.config.vm.kernel_args, *request.kernel_args),
            disks=tuple(disks),
            nics=tuple(nics),
            accel=self._accel,
        )
        try:
            machine: Machine = await vm.launch(spec, spawn=spawn)
        except vm.VmError as e:
            raise Failed(str(e)) from None
        return machine

    async def attach(self, runtime_dir: Path) -> Machine:
        machine: Machine = await _module("spinbox.vm").VirtualMachine.attach(runtime_dir)
        return machine

    # -- the guest ----------------------------------------------------------

    async def configure_guest(self, machine: Machine, setup: GuestSetup) -> str:
        client = _module("spinbox.vm.agent").AgentClient
        agent = await client.connect(machine.control_address)
        try:
            if setup.network is not None and len(setup.network.interfaces):
                await agent.configure_network(setup.network)
            if setup.mount is not None:
                return str(await agent.mount_rootfs(setup.mount))
            return ""
        finally:
            await agent.close()

    async def quiesce_guest(self, machine: Machine, container_id: str, unmount: bool) -> None:
        client = _module("spinbox.vm.agent").AgentClient
        agent = await client.connect(machine.control_address)
        try:
            if unmount:
                await agent.unmount_rootfs(container_id)
            else:
                await agent.sync_rootfs(container_id)
        finally:
            await agent.close()
