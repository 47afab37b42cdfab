"""VM lifecycles: create, stop, adopt after a restart, and clean up what a crash left."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from spinbox.busnames import MANAGER_PATH
from spinbox.config import Config
from spinbox.daemon import guestrecord, pod, release, resize, share
from spinbox.daemon.backend import Backend, GuestSetup, Launch, Machine, Rootfs
from spinbox.daemon.endings import Endings
from spinbox.daemon.errors import AlreadyExists, Failed, NoNetwork, NotFound, SpinboxError
from spinbox.daemon.keep import KeptStorage, move_aside
from spinbox.daemon.leftover import Leftover, clean_up, recover
from spinbox.daemon.logs import JournalSink, LogForwarder
from spinbox.daemon.options import VmRequest, check_vm_id, escape_path_element
from spinbox.daemon.rescue import write_back_with_helper
from spinbox.daemon.scopememory import ScopeMemoryWatch, scope_ending
from spinbox.daemon.spawn import ScopeSpawner, make_fifo, qemu_log_fifo
from spinbox.daemon.state import STORAGE_DIR, VmState, vm_dir
from spinbox.daemon.systemd import ScopeLimits, SystemdManager, scope_name
from spinbox.daemon.templates import TemplateStore
from spinbox.daemon.virtiofsd import start_share
from spinbox.mounts import MountSpec, Volume
from spinbox.storage.system import remove_tree
from spinbox.vm.ending import Ending

log = logging.getLogger(__name__)


def vm_object_path(vm_id: str) -> str:
    return f"{MANAGER_PATH}/vm/{escape_path_element(vm_id)}"


class Publisher(Protocol):
    """The bus side: exports VM objects and announces changes."""

    def publish(self, vm: Vm) -> None: ...
    def unpublish(self, vm: Vm) -> None: ...
    def changed(self, vm: Vm, properties: dict[str, Any]) -> None: ...


@dataclass
class Vm:
    state: VmState
    runtime_dir: Path
    machine: Machine
    rootfs: Rootfs | None
    forwarder: LogForwarder
    finished: asyncio.Future[None] | None = None
    exit_task: asyncio.Task[None] | None = None
    # A pod's further containers' rootfses, by container id (state.added_rootfs says more).
    added: dict[str, Rootfs] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Containers whose writable layer the guest sent for good at stop, and what failed there.
    exported: set[str] = field(default_factory=set)
    writeback_errors: list[str] = field(default_factory=list)
    # Containers whose writable layer could not be written back, and why: kept, never released.
    unwritten: dict[str, str] = field(default_factory=dict)
    # Containers whose layer the release wrote back (or had none to write) before dropping its image.
    saved: set[str] = field(default_factory=set)
    # spinboxd's copy of the port-forward listener handed to the shim (VM.OpenPortForward).
    port_forward: socket.socket | None = None
    # The memory events of the VM's scope (None without cgroup2's memory controller).
    memory: ScopeMemoryWatch | None = None
    # The record of where its guest is being made (VM.RecordGuestState), if one is.
    recording: asyncio.Task[None] | None = None

    def rootfses(self) -> dict[str, Rootfs]:
        """Every rootfs of the VM by container id, a pod's further containers' too."""
        own = {self.state.container_id: self.rootfs} if self.rootfs is not None else {}
        return {**own, **self.added}

    @property
    def id(self) -> str:
        return self.state.id

    @property
    def path(self) -> str:
        return vm_object_path(self.state.id)

    @property
    def phase(self) -> str:
        return self.state.phase


@dataclass
class CreateProgress:
    """The step a VM's creation is in, for the error its deadline gives."""

    step: str = "checking the request"


class VmManager:
    def __init__(
        self,
        config: Config,
        systemd: SystemdManager,
        backend: Backend,
        run_dir: Path,
        storage_dir: Path = STORAGE_DIR,
        on_count_changed: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.config = config
        self.systemd = systemd
        self.backend = backend
        self.run_dir = run_dir
        self.storage_dir = storage_dir
        self.vms: dict[str, Vm] = {}
        self.publisher: Publisher | None = None
        self._reserved: set[str] = set()
        # VMs being created whose QEMU (and so its scope and logs) was started.
        self._launched: set[str] = set()
        self._creating: set[asyncio.Task[Any]] = set()
        # The task creating each VM id, for those who must wait for its outcome.
        self._creating_ids: dict[str, asyncio.Task[Any]] = {}
        self._on_count_changed = on_count_changed
        self.endings = Endings()
        self.kept = KeptStorage()
        self.templates = TemplateStore(config, systemd, backend, run_dir / "templates")
        # VMs a previous spinboxd left, being cleaned up in the background; set once each is gone.
        self.recovering: dict[str, asyncio.Event] = {}
        self._leftovers: list[Leftover] = []
        self._cleanup: asyncio.Task[None] | None = None

    # -- queries ------------------------------------------------------------

    def get(self, vm_id: str) -> Vm:
        check_vm_id(vm_id)
        vm = self.vms.get(vm_id)
        if vm is None:
            raise NotFound(f"there is no VM {vm_id!r}")
        return vm

    async def settled(self, vm_id: str) -> Vm:
        """The VM, once a creation of it in progress has ended (NotFound if it failed).
        A caller who gave up on a CreateVM finds the VM this way to remove it,
        instead of missing a VM that was still being created."""
        check_vm_id(vm_id)
        task = self._creating_ids.get(vm_id)
        if task is not None:
            await asyncio.wait({task})
        cleaned = self.recovering.get(vm_id)
        if cleaned is not None:
            # A VM left by a previous spinboxd is answered once cleaned up (its layers written back).
            await cleaned.wait()
        return self.get(vm_id)

    def _count_changed(self) -> None:
        self._on_count_changed(len(self.vms))

    def _set_phase(self, vm: Vm, phase: str) -> None:
        vm.state.phase = phase
        if phase != "stopped":
            vm.state.save(vm.runtime_dir)
        if self.publisher is not None:
            self.publisher.changed(vm, {"State": phase})

    async def open_port_forward(self, vm: Vm) -> socket.socket:
        """A listener in the VM's network namespace that its connections to 127.0.0.1 are
        redirected to; spinboxd keeps its own copy until the VM is released."""
        if not vm.state.network:
            raise NoNetwork(f"VM {vm.id!r} has no network: there are no ports to forward from the host")
        async with vm.lock:
            if vm.phase not in ("running", "paused"):
                raise Failed(f"VM {vm.id!r} is {vm.phase}")
            sock = await self.backend.open_port_forward(vm.id)
            if vm.port_forward is not None:
                vm.port_forward.close()
            vm.port_forward = sock
        return sock

    # -- create -------------------------------------------------------------

    async def prepare_netns(self, vm_id: str) -> tuple[str, int]:
        check_vm_id(vm_id)
        if vm_id in self.vms or vm_id in self._reserved:
            raise AlreadyExists(f"VM {vm_id!r} already exists")
        self.check_not_recovering(vm_id)
        return await self.backend.prepare_netns(vm_id)

    async def create(self, request: VmRequest) -> Vm:
        vm_id = request.id
        if vm_id in self.vms or vm_id in self._reserved:
            raise AlreadyExists(f"VM {vm_id!r} already exists")
        self.check_not_recovering(vm_id)
        runtime_dir = vm_dir(self.run_dir, vm_id)
        if runtime_dir.exists():
            raise AlreadyExists(f"VM {vm_id!r} already exists (state in {runtime_dir})")
        self._reserved.add(vm_id)
        task = asyncio.current_task()
        if task is not None:
            self._creating.add(task)
            self._creating_ids[vm_id] = task
        progress = CreateProgress()
        deadline = self.config.timeouts.create
        try:
            async with asyncio.timeout(deadline) as scope:
                return await self._create(request, runtime_dir, progress)
        except SpinboxError:
            raise
        except TimeoutError:
            if not scope.expired():
                raise
            logs = scope_name(vm_id) if vm_id in self._launched else "spinbox.service"
            log.error(
                "VM %s: %s did not finish within timeouts.create (%gs); undone",
                vm_id,
                progress.step,
                deadline,
            )
            raise Failed(
                f"VM {vm_id!r} was not created within {deadline:g}s (timeouts.create): {progress.step} "
                f"did not finish; what the VM had taken was given back (logs: journalctl -u {logs})"
            ) from None
        except Exception as e:
            log.exception("creating VM %s failed", vm_id)
            # Before QEMU started (storage, network), only spinboxd's own log says more.
            logs = scope_name(vm_id) if vm_id in self._launched else "spinbox.service"
            raise Failed(f"VM {vm_id!r} could not be created: {e} (logs: journalctl -u {logs})") from None
        finally:
            self._launched.discard(vm_id)
            self._reserved.discard(vm_id)
            if task is not None:
                self._creating.discard(task)
                self._creating_ids.pop(vm_id, None)

    async def _create(self, request: VmRequest, runtime_dir: Path, progress: CreateProgress) -> Vm:
        vm_id = request.id
        scope = scope_name(vm_id)
        started = time.monotonic()
        timeline: dict[str, float] = {}

        def mark(phase: str) -> None:
            timeline[phase] = round(time.monotonic() - started, 6)

        limits = ScopeLimits.for_vm(request.vcpus, request.memory_mib, self.config.vm.memory_overhead_mib)
        resources: dict[str, Any] = {
            "vcpus": request.vcpus,
            "memory-mib": request.memory_mib,
            # What it booted with: a resize never gives back less.
            "boot-vcpus": request.vcpus,
            "boot-memory-mib": request.memory_mib,
            "memory-max": limits.memory_max,
            "cpu-quota-per-sec-usec": limits.cpu_quota_per_sec_usec,
            "tasks-max": limits.tasks_max,
            "accelerator": self.backend.accelerator(),
            "annotations": dict(request.annotations),
            "hotplug-ports": request.hotplug_ports,
        }
        state = VmState(
            id=vm_id,
            phase="creating",
            scope=scope,
            container_id=request.container_id,
            namespace=request.namespace,
            netns=request.netns or "",
            resources=resources,
            timeline=timeline,
            created_at=time.time(),
        )
        async with AsyncExitStack() as undo:
            os.makedirs(runtime_dir, mode=0o700)
            # Unmounts the share's volumes before removing anything.
            undo.push_async_callback(asyncio.to_thread, share.remove_runtime_dir, runtime_dir)
            # The network goes first: it also removes a namespace from
            # PrepareNetworkNamespace when this VM fails.
            state.network = True
            undo.push_async_callback(self.backend.teardown_network, vm_id)
            state.save(runtime_dir)

            progress.step = "preparing the rootfs"
            rootfs: Rootfs | None = None
            disks: list[Any] = []
            mount = None
            if request.rootfs:
                work_dir = self.storage_dir / vm_id
                try:
                    await asyncio.to_thread(move_aside, self.kept, work_dir, vm_id)
                except OSError as e:
                    raise Failed(
                        f"the storage directory {work_dir} of an earlier VM {vm_id!r} is in the way "
                        f"and could not be moved aside: {e.strerror}"
                    ) from None
                state.storage_dir = str(work_dir)
                state.save(runtime_dir)
                undo.push_async_callback(asyncio.to_thread, remove_tree, work_dir)
                rootfs, disk_list, mount = await self.backend.prepare_rootfs(request, work_dir)
                undo.push_async_callback(rootfs.release)
                disks = list(disk_list)
            mark("storage")

            progress.step = "setting up the network"
            network, nics = await self.backend.setup_network(request)
            undo.callback(network.close)
            mark("network")

            forwarder = LogForwarder(JournalSink(vm_id, scope), qemu_log_fifo(runtime_dir))
            make_fifo(qemu_log_fifo(runtime_dir))
            forwarder.start_fifo()
            undo.push_async_callback(forwarder.stop)

            progress.step = "starting QEMU in its scope"
            spawner = ScopeSpawner(self.systemd, vm_id, runtime_dir, limits, f"spinbox VM {vm_id}")
            undo.push_async_callback(spawner.abort)
            virtiofs = None
            if request.share:
                state.share = True
                state.save(runtime_dir)
                progress.step = "preparing the share and starting its virtiofsd"
                timeout = self.config.timeouts.virtiofsd_start
                uid_base = self.config.vm.uid_base if self.config.vm.confine else None
                virtiofs = await start_share(request, runtime_dir, spawner, timeout, uid_base)
                undo.enter_context(virtiofs)
                mark("share")
            self._launched.add(vm_id)
            template = await self.templates.for_vm(request, [disk.path for disk in disks], len(nics))
            resources["boot"] = "template" if template is not None else "cold"
            try:
                machine = await self.backend.launch(
                    Launch(
                        request,
                        runtime_dir,
                        disks,
                        nics,
                        spawner,
                        template=template,
                        virtiofs_fd=None if virtiofs is None else virtiofs.qemu_fd,
                    )
                )
            except Failed as e:
                if template is None:
                    raise
                # A template that cannot serve: the VM boots cold, the template goes (and is rebuilt).
                log.error("VM %s boots cold: %s", vm_id, e)
                self.templates.discard(template.directory, str(e))
                await spawner.abort()
                spawner = ScopeSpawner(self.systemd, vm_id, runtime_dir, limits, f"spinbox VM {vm_id}")
                undo.push_async_callback(spawner.abort)
                resources["boot"] = "cold"
                machine = await self.backend.launch(Launch(request, runtime_dir, disks, nics, spawner))
            if virtiofs is not None:
                virtiofs.close()  # QEMU's end is QEMU's alone: virtiofsd ends when QEMU does
            # Undone in reverse: QEMU killed, then its pid no longer named in logs.
            undo.callback(setattr, forwarder.sink, "pid", 0)
            undo.push_async_callback(machine.kill)
            network.close()
            mark("qemu-started")
            state.pid = machine.pid
            state.save(runtime_dir)

            forwarder.sink.pid = machine.pid
            forwarder.start_sockets(machine.console_socket, machine.log_socket)

            progress.step = "waiting for the guest's agent"
            await machine.wait_ready(self.config.vm.boot_timeout)
            progress.step = "configuring the guest (network, rootfs mount)"
            mark("agent-ready")
            state.rootfs_path = await self.backend.configure_guest(machine, GuestSetup(network.guest, mount))
            mark("guest-configured")
            if network.guest is not None:
                state.addresses = [a for interface in network.guest.interfaces for a in interface.addresses]

            state.agent_address = machine.agent_address
            state.control_address = machine.control_address
            for phase, stamp in machine.timeline.items():
                timeline.setdefault(f"vm.{phase}", float(stamp))
            state.phase = "running"
            state.save(runtime_dir)
            vm = Vm(state, runtime_dir, machine, rootfs, forwarder)
            undo.pop_all()
        self._adopt(vm)
        boot = resources["boot"]
        log.info("VM %s is running (QEMU pid %d, %s, %s boot)", vm_id, vm.state.pid, scope, boot)
        return vm

    def _forwarder(self, vm_id: str, runtime_dir: Path, machine: Machine) -> LogForwarder:
        forwarder = LogForwarder(JournalSink(vm_id, scope_name(vm_id)), qemu_log_fifo(runtime_dir))
        forwarder.sink.pid = machine.pid
        forwarder.start_fifo()
        forwarder.start_sockets(machine.console_socket, machine.log_socket)
        return forwarder

    def _adopt(self, vm: Vm) -> None:
        loop = asyncio.get_running_loop()
        vm.finished = loop.create_future()
        # Nobody may be waiting when a VM ends by itself; its failure is logged.
        vm.finished.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.vms[vm.id] = vm
        vm.memory = ScopeMemoryWatch.for_process(vm.id, vm.state.pid)
        vm.exit_task = loop.create_task(self._watch_exit(vm))
        if self.publisher is not None:
            self.publisher.publish(vm)
        self._count_changed()

    # -- running ------------------------------------------------------------

    async def pause(self, vm: Vm) -> None:
        if vm.phase != "running":
            raise Failed(f"VM {vm.id!r} is {vm.phase}, not running")
        await vm.machine.pause()
        self._set_phase(vm, "paused")

    async def resume(self, vm: Vm) -> None:
        if vm.phase != "paused":
            raise Failed(f"VM {vm.id!r} is {vm.phase}, not paused")
        await vm.machine.resume()
        self._set_phase(vm, "running")

    async def resize(self, vm: Vm, vcpus: int, memory_mib: int) -> dict[str, Any]:
        return await resize.resize(self, vm, vcpus, memory_mib)

    async def record_guest_state(self, vm: Vm, reason: str) -> None:
        await guestrecord.record_guest_state(vm, reason)

    async def sync_rootfs(self, vm: Vm) -> None:
        """Write every rootfs of the VM back (a pod's further containers' too)."""
        rootfses = vm.rootfses()
        if not rootfses:
            raise Failed(f"VM {vm.id!r} has no writable rootfs to sync")
        if vm.phase != "running":
            raise Failed(f"VM {vm.id!r} is {vm.phase}, not running")
        for container_id, rootfs in rootfses.items():
            if rootfs.writable:
                await self.backend.export_upper(vm.machine, container_id, rootfs)

    # -- a pod's further containers -----------------------------------------

    async def add_rootfs(self, vm: Vm, container_id: str, mounts: tuple[MountSpec, ...]) -> str:
        return await pod.add_rootfs(self, vm, container_id, mounts)

    async def add_volumes(self, vm: Vm, container_id: str, volumes: tuple[Volume, ...]) -> None:
        await pod.add_volumes(vm, container_id, volumes)

    async def remove_rootfs(self, vm: Vm, container_id: str) -> None:
        await pod.remove_rootfs(self, vm, container_id)

    # -- stop ---------------------------------------------------------------

    async def stop(self, vm: Vm, timeout: float, force: bool = False) -> None:  # noqa: ASYNC109
        """Shut the VM down (orderly unless `force`); returns once everything is released."""
        assert vm.finished is not None
        if vm.phase not in ("stopping", "stopped"):
            was_paused = vm.phase == "paused"
            self._set_phase(vm, "stopping")
            try:
                if force:
                    await vm.machine.kill()
                else:
                    if was_paused:
                        # Only a running guest can shut down in order.
                        await vm.machine.resume()
                    for container_id, rootfs in vm.rootfses().items():
                        await self._export_at_stop(vm, container_id, rootfs)
                    # The agent's Shutdown ends the containers, then syncs and unmounts every rootfs.
                    await vm.machine.shutdown(timeout)
            except Exception:
                log.exception("shutting VM %s down failed; killing it", vm.id)
                try:
                    await vm.machine.kill()
                except Exception as error:  # QEMU may be gone already; its end is awaited below
                    log.error("killing VM %s failed: %s", vm.id, error)
        await asyncio.shield(vm.finished)

    async def _export_at_stop(self, vm: Vm, container_id: str, rootfs: Rootfs) -> None:
        await release.export_at_stop(self, vm, container_id, rootfs)

    async def _write_back_with_helper(self, vm_id: str, container_id: str, rootfs: Rootfs) -> None:
        await write_back_with_helper(
            self.systemd,
            self.backend,
            self.run_dir,
            vm_id,
            container_id,
            rootfs,
            self.config.vm.memory_overhead_mib,
        )

    async def _watch_exit(self, vm: Vm) -> None:
        assert vm.finished is not None
        try:
            await vm.machine.wait_exit()
            ending = self._ending_of(vm)  # first: the scope's memory events may go with it
            # From here on the pid may be another process's.
            vm.forwarder.sink.pid = 0
            self.endings.record(vm.id, ending, vm.state.pid, vm.forwarder.sink)
            await self._release(vm)
        except Exception as e:
            log.exception("releasing VM %s failed", vm.id)
            if not vm.finished.done():
                vm.finished.set_exception(Failed(f"VM {vm.id!r} stopped but was not fully released: {e}"))
        else:
            if not vm.finished.done():
                vm.finished.set_result(None)

    async def ending(self, vm_id: str, wait: float) -> Ending:
        """How the VM's QEMU ended, waiting up to `wait` seconds for it to end."""
        check_vm_id(vm_id)
        vm = self.vms.get(vm_id)
        if vm is not None and vm_id not in self.endings:
            try:
                async with asyncio.timeout(wait):
                    await vm.machine.wait_exit()
            except TimeoutError:
                raise Failed(f"VM {vm_id!r} is still running after {wait:g} s") from None
            return self._ending_of(vm)
        ending = self.endings.get(vm_id)
        if ending is None:
            raise NotFound(f"there is no VM {vm_id!r}, nor one that ended lately")
        return ending

    @staticmethod
    def _ending_of(vm: Vm) -> Ending:
        """How the ended VM's QEMU ended, its scope's memory limit's OOM kill included."""
        limit = int(vm.state.resources.get("memory-max", 0))
        ending = scope_ending(vm.machine.ending or Ending(None), vm.memory, limit)
        if vm.memory is not None:
            vm.memory.close()
        return ending

    async def _release(self, vm: Vm) -> None:
        await release.release(self, vm)

    async def abandon_creations(self, timeout: float = 30) -> None:  # noqa: ASYNC109
        """At spinboxd exit: give up VMs still being created, undoing what they took."""
        tasks = set(self._creating)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def stop_all_watchers(self) -> None:
        """At spinboxd exit: stop watching (the VMs keep running)."""
        for vm in list(self.vms.values()):
            if vm.exit_task is not None:
                vm.exit_task.cancel()
            await vm.forwarder.stop(drain=0)
            if vm.memory is not None:
                vm.memory.close()
            with contextlib.suppress(Exception):
                await vm.machine.detach()

    # -- restart ------------------------------------------------------------

    async def recover(self) -> None:
        """Re-adopt the VMs a previous spinboxd left running (before spinboxd takes its bus name);
        the rest are cleaned up by start_cleanup's task."""
        self._leftovers = await recover(self)

    def start_cleanup(self) -> asyncio.Task[None]:
        """Clean up, in the background, the VMs a previous spinboxd left dead or half made."""
        leftovers, self._leftovers = self._leftovers, []
        self._cleanup = asyncio.get_running_loop().create_task(clean_up(self, leftovers))
        return self._cleanup

    async def abandon_cleanup(self, timeout: float = 30) -> None:  # noqa: ASYNC109
        """At spinboxd exit: stop cleaning up (the next spinboxd finishes it)."""
        if self._cleanup is not None and not self._cleanup.done():
            self._cleanup.cancel()
            await asyncio.wait({self._cleanup}, timeout=timeout)

    def check_not_recovering(self, vm_id: str) -> None:
        if vm_id in self.recovering:
            raise AlreadyExists(
                f"VM {vm_id!r} was left by a previous spinboxd and is being cleaned up (its writable "
                "layers written back); try again once it is gone"
            )
