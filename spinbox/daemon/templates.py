"""The VM templates spinboxd keeps: one per kernel, guest image, QEMU and VM size.

A template lives in `<run dir>/templates/<shape>-<digest>/` (its RAM and
device state, see spinbox.vm.template), where the digest covers everything
a restored VM must share with the template: the kernel, the guest image and
QEMU (by path, size and modification time), the accelerator, the kernel
arguments and the number of spare PCIe ports. A changed kernel, image or QEMU
gives a new digest: the next VM of that size boots cold while the new
template is built in the background, and the old one is removed once the new
one is ready (the VMs restored from it map its RAM and keep it).
Builds run one at a time, each in a scope of its own.

What restored VMs map is not the RAM file but a copy of it in a memfd sealed
against writes (spinbox.vm.template.load_ram), which spinboxd loads once per
template, at the first restore after the template was built or after
spinboxd started, and keeps while the template is in use.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from spinbox.config import Config
from spinbox.daemon.logs import JournalSink, LogForwarder
from spinbox.daemon.options import VmRequest
from spinbox.daemon.spawn import ScopeSpawner, make_fifo, qemu_log_fifo
from spinbox.daemon.systemd import ScopeLimits, SystemdManager
from spinbox.vm.errors import VmError
from spinbox.vm.spec import SLOT_DISK_BYTES
from spinbox.vm.template import TemplateFiles, load_ram

log = logging.getLogger(__name__)

# Spare PCIe ports of a template: a VM restored from it plugs its disks and
# NICs into them, and a pod keeps the rest for its further containers' disks.
TEMPLATE_PORTS = 24
# The most VM sizes spinboxd keeps templates for (the default size among them).
MAX_SHAPES = 4
# Bumped when what a template holds changes in a way its digest does not see.
FORMAT = 4
READY = "ready.json"


@dataclass(frozen=True)
class Shape:
    vcpus: int
    memory_mib: int

    @property
    def name(self) -> str:
        return f"{self.vcpus}cpu-{self.memory_mib}m"


@dataclass(frozen=True)
class Template:
    """A ready template: its directory, and its RAM as the sealed memfd restored VMs map."""

    directory: Path
    ram: int

    @property
    def name(self) -> str:
        return self.directory.name


class TemplateReplaced(Exception):
    """A template removed (a newer one replaced it) while spinboxd loaded its RAM."""


class TemplateBackend(Protocol):
    def template_identity(self, shape: Shape, ports: int) -> dict[str, Any]:
        """What a restored VM must share with its template: files, QEMU, its command line."""
        ...

    async def build_template(
        self, shape: Shape, ports: int, directory: Path, runtime_dir: Path, spawn: ScopeSpawner
    ) -> None: ...


class TemplateStore:
    def __init__(self, config: Config, systemd: SystemdManager, backend: Any, root: Path) -> None:
        self.config = config
        self.systemd = systemd
        self.backend: TemplateBackend = backend
        self.root = root
        self._builds: dict[str, asyncio.Task[None]] = {}
        self._failed: set[str] = set()
        self._one_at_a_time = asyncio.Lock()
        self._rams: dict[str, int] = {}
        self._loading = asyncio.Lock()
        self._preloads: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self.config.vm.boot == "template"

    def start(self) -> None:
        """At spinboxd start: build the default size's template when it is missing."""
        if not self.enabled:
            return
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for partial in self.root.glob("*.partial"):
            shutil.rmtree(partial, ignore_errors=True)  # a build an earlier spinboxd did not finish
        ready = self.directory(Shape(self.config.vm.vcpus, self.config.vm.memory_mib), build=True)
        if ready is not None:
            log.info("VM template %s is ready", ready.name)
            self._preload(ready)

    def lookup(self, request: VmRequest, disks: int, nics: int = 0) -> Path | None:
        """The template a VM for `request` with `disks` disks and `nics` NICs restores from;
        None: it boots cold."""
        if not self.enabled or request.kernel_args:
            return None
        if self.ports_needed(disks, nics) + request.hotplug_ports > TEMPLATE_PORTS:
            return None
        if nics < self.nic_slots:
            return None  # a NIC slot must have a NIC (spinbox.vm.template)
        return self.directory(Shape(request.vcpus, request.memory_mib), build=True)

    @property
    def nic_slots(self) -> int:
        """The NIC slots of this spinboxd's templates: none with networking off."""
        return (
            self.config.vm.template_nic_slots if self.config.network_table.get("enabled", True) is True else 0
        )

    def ports_needed(self, disks: int, nics: int) -> int:
        """The spare ports of a restored VM that its disks and NICs take: every device slot, and
        a port for each device beyond them."""
        disk_slots, nic_slots = self.config.vm.template_disk_slots, self.nic_slots
        return disk_slots + nic_slots + max(0, disks - disk_slots) + max(0, nics - nic_slots)

    async def for_vm(self, request: VmRequest, disks: Sequence[Path], nics: int) -> Template | None:
        """The loaded template a VM for `request` with the disk images `disks` restores from; None: it
        boots cold (said in the journal when a template exists but cannot serve, which is then discarded)."""
        if request.share and self.enabled:
            # virtiofsd maps guest RAM: it must be a shared memfd, never a template's file.
            log.info("VM %s boots cold, not from a template: it has a virtio-fs share", request.id)
            return None
        if self.enabled and (too_large := _larger_than_a_slot(disks[: self.config.vm.template_disk_slots])):
            log.info(
                "VM %s boots cold, not from a template: its disk %s is larger than a template's "
                "disk slot (%d bytes)",
                request.id,
                too_large,
                SLOT_DISK_BYTES,
            )
            return None
        # A template replaced by a rebuilt one while its RAM was loaded: the new one serves.
        for _ in range(2):
            directory = self.lookup(request, len(disks), nics)
            if directory is None:
                return None
            try:
                return await self.load(directory)
            except TemplateReplaced:
                continue
            except (OSError, VmError) as e:
                log.error("VM %s boots cold: the template %s cannot serve: %s", request.id, directory.name, e)
                self.discard(directory, str(e))
                return None
        log.info("VM %s boots cold: its template was replaced twice while it was loaded", request.id)
        return None

    async def load(self, directory: Path) -> Template:
        """The template in `directory` with its sealed RAM, loaded at the first call (OSError, VmError;
        TemplateReplaced when it was removed meanwhile)."""
        async with self._loading:
            ram = self._rams.get(directory.name)
            if ram is None:
                try:
                    ram = await asyncio.to_thread(load_ram, TemplateFiles(directory))
                except (OSError, VmError):
                    if not _is_ready(directory):
                        raise TemplateReplaced(directory.name) from None
                    raise
                # Checked here, in the loop, where _remove_stale runs: not in the thread.
                if not _is_ready(directory):
                    # Removed as stale while it loaded: nothing would ever close this copy.
                    os.close(ram)
                    raise TemplateReplaced(directory.name)
                self._rams[directory.name] = ram
        return Template(directory, ram)

    def _preload(self, directory: Path) -> None:
        """Load a ready template's RAM now, in the background, rather than when the first VM
        restored from it starts (which then waits for this load, not for one of its own)."""
        task = asyncio.get_running_loop().create_task(self._load_ahead(directory))
        self._preloads.add(task)
        task.add_done_callback(self._preloads.discard)

    async def _load_ahead(self, directory: Path) -> None:
        try:
            await self.load(directory)
        except TemplateReplaced:
            pass  # its successor is loaded once built
        except (OSError, VmError) as e:
            self.discard(directory, f"its RAM cannot be loaded: {e}")

    def _forget(self, name: str) -> None:
        """Close spinboxd's copy of a template's RAM (the VMs restored from it keep theirs)."""
        ram = self._rams.pop(name, None)
        if ram is not None:
            os.close(ram)

    def directory(self, shape: Shape, build: bool = False) -> Path | None:
        """The ready template of `shape`; with `build`, start building it in the background if missing."""
        try:
            name = f"{shape.name}-{self._digest(shape)}"
        except Exception as e:  # no kernel or guest image yet: VMs boot cold (and fail saying so)
            log.warning("no VM template for %s: %s", shape.name, e)
            return None
        directory = self.root / name
        if (directory / READY).exists():
            return directory
        if build and name not in self._builds and name not in self._failed:
            shapes = {_shape_of(n) for n in self._builds} | self._ready_shapes()
            if shape.name in shapes or len(shapes) < MAX_SHAPES:
                task = asyncio.get_running_loop().create_task(self._build(shape, name))
                self._builds[name] = task
                task.add_done_callback(lambda _: self._builds.pop(name, None))
        return None

    def discard(self, directory: Path, error: str) -> None:
        """A template a VM could not be restored from: removed, so that the next VM of its
        size boots cold and a new one is built."""
        log.error("removing the VM template %s, which cannot serve: %s", directory.name, error)
        self._forget(directory.name)
        shutil.rmtree(directory, ignore_errors=True)

    async def wait_built(self) -> None:
        """Until the builds under way have ended (tests, benchmarks)."""
        while self._builds:
            await asyncio.wait(set(self._builds.values()))

    async def close(self) -> None:
        tasks = {*self._builds.values(), *self._preloads}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        for name in list(self._rams):
            self._forget(name)

    def _ready_shapes(self) -> set[str]:
        if not self.root.is_dir():
            return set()
        return {_shape_of(p.name) for p in self.root.iterdir() if (p / READY).exists()}

    def _digest(self, shape: Shape) -> str:
        identity = {
            "format": FORMAT,
            "shape": [shape.vcpus, shape.memory_mib],
            "ports": TEMPLATE_PORTS,
            **self.backend.template_identity(shape, TEMPLATE_PORTS),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    async def _build(self, shape: Shape, name: str) -> None:
        async with self._one_at_a_time:
            partial = self.root / f"{name}.partial"
            vm_id = f"template-{name}"
            try:
                await self._build_into(shape, vm_id, partial)
                final = self.root / name
                shutil.rmtree(final, ignore_errors=True)
                partial.rename(final)
            except asyncio.CancelledError:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            except Exception as e:
                shutil.rmtree(partial, ignore_errors=True)
                self._failed.add(name)
                log.error("building the VM template %s failed (VMs of this size boot cold): %s", name, e)
                return
            log.info("VM template %s is ready", name)
            self._remove_stale(shape, name)
            self._preload(final)

    async def _build_into(self, shape: Shape, vm_id: str, partial: Path) -> None:
        shutil.rmtree(partial, ignore_errors=True)
        runtime_dir = partial / "run"
        runtime_dir.mkdir(parents=True, mode=0o700)
        limits = ScopeLimits.for_vm(shape.vcpus, shape.memory_mib, self.config.vm.memory_overhead_mib)
        spawner = ScopeSpawner(self.systemd, vm_id, runtime_dir, limits, f"spinbox VM template {vm_id}")
        forwarder = LogForwarder(JournalSink(vm_id, spawner.scope), qemu_log_fifo(runtime_dir))
        make_fifo(qemu_log_fifo(runtime_dir))
        forwarder.start_fifo()
        # The template's console and vminitd's log lines go to the journal now:
        # left unread, the guest would hold them and every restored VM repeat them.
        forwarder.start_sockets(runtime_dir / "console.sock", runtime_dir / "log.sock")
        log.info("building the VM template %s", vm_id)
        try:
            await self.backend.build_template(shape, TEMPLATE_PORTS, partial, runtime_dir, spawner)
        finally:
            await spawner.abort()  # the template's QEMU has ended: its scope goes
            await forwarder.stop()
        shutil.rmtree(runtime_dir, ignore_errors=True)
        (partial / READY).write_text(json.dumps({"vcpus": shape.vcpus, "memory_mib": shape.memory_mib}))

    def _remove_stale(self, shape: Shape, name: str) -> None:
        """Templates of the same size made for an earlier kernel, image or QEMU."""
        for directory in self.root.glob(f"{shape.name}-*"):
            if directory.name != name and not directory.name.endswith(".partial"):
                log.info("removing the stale VM template %s", directory.name)
                self._forget(directory.name)
                shutil.rmtree(directory, ignore_errors=True)


def _is_ready(directory: Path) -> bool:
    return (directory / READY).exists()


def _shape_of(name: str) -> str:
    """The size part ("1cpu-512m") of a template's directory name."""
    return "-".join(name.split("-")[:2])


def _larger_than_a_slot(disks: Sequence[Path]) -> Path | None:
    """The first of `disks` too large for a template's disk slot: the guest sees a slot's disk as
    large as the slot's placeholder was when the template booted."""
    for disk in disks:
        try:
            if disk.stat().st_size > SLOT_DISK_BYTES:
                return disk
        except OSError:
            continue  # the VM's own start names a missing image
    return None
