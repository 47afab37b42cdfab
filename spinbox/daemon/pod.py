"""A pod's further containers in its running VM: their rootfses (hot-plugged disks the guest
mounts) and their volumes (binds in the VM's share)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from spinbox.daemon import share
from spinbox.daemon.backend import Rootfs
from spinbox.daemon.errors import AlreadyExists, Failed, InvalidArgument, NotFound, SpinboxError
from spinbox.daemon.options import check_container_id
from spinbox.daemon.release import guest_unreachable, kept_where
from spinbox.mounts import MountSpec, Volume
from spinbox.storage.errors import SnapshotGone

if TYPE_CHECKING:
    from spinbox.daemon.manager import Vm, VmManager

log = logging.getLogger(__name__)

# How long a guest that cannot be reached has for its QEMU to be seen ending.
QEMU_END_GRACE = 5.0


async def add_rootfs(manager: VmManager, vm: Vm, container_id: str, mounts: tuple[MountSpec, ...]) -> str:
    """Prepare a further container's rootfs, hot-plug its disks and have the guest mount it."""
    check_container_id(container_id)
    if not mounts:
        raise InvalidArgument(f"the rootfs of container {container_id!r} has no mounts")
    async with vm.lock:
        if vm.phase != "running":
            raise Failed(f"VM {vm.id!r} is {vm.phase}, not running")
        if container_id == vm.state.container_id or container_id in vm.added:
            raise AlreadyExists(f"VM {vm.id!r} already has a rootfs for container {container_id!r}")
        used = {entry["prefix"] for entry in vm.state.added_rootfs.values()}
        prefix = next(f"sb{n}" for n in range(1, len(used) + 2) if f"sb{n}" not in used)
        if not vm.state.storage_dir:
            vm.state.storage_dir = str(manager.storage_dir / vm.id)
            vm.state.save(vm.runtime_dir)
        try:
            return await _add_rootfs(manager, vm, container_id, mounts, prefix)
        except SpinboxError:
            raise
        except Exception as e:
            log.exception("adding the rootfs of %s to VM %s failed", container_id, vm.id)
            raise Failed(
                f"the rootfs of container {container_id!r} could not be added to VM {vm.id!r}: {e}"
            ) from None


async def _add_rootfs(
    manager: VmManager, vm: Vm, container_id: str, mounts: tuple[MountSpec, ...], prefix: str
) -> str:
    work_dir = Path(vm.state.storage_dir)
    async with AsyncExitStack() as undo:
        rootfs, disks, mount = await manager.backend.prepare_added_rootfs(
            container_id, mounts, work_dir, prefix
        )
        undo.push_async_callback(rootfs.release)
        for disk in disks:
            await vm.machine.add_disk(disk)
            undo.push_async_callback(vm.machine.remove_disk, disk.serial)
        path = await manager.backend.mount_rootfs(vm.machine, mount)
        vm.added[container_id] = rootfs
        vm.state.added_rootfs[container_id] = {
            "prefix": prefix,
            "serials": [disk.serial for disk in disks],
            "path": path,
        }
        vm.state.save(vm.runtime_dir)
        undo.pop_all()
    log.info("VM %s: added the rootfs of container %s at %s", vm.id, container_id, path)
    return path


async def add_volumes(vm: Vm, container_id: str, volumes: tuple[Volume, ...]) -> None:
    """Bind a further container's volumes into the running VM's share (seen by its virtiofsd)."""
    check_container_id(container_id)
    async with vm.lock:
        if vm.phase != "running":
            raise Failed(f"VM {vm.id!r} is {vm.phase}, not running")
        if not vm.state.share:
            raise Failed(f"VM {vm.id!r} was created without a share (CreateVM's option 'share')")
        directory = share.share_dir(vm.runtime_dir)
        if (directory / container_id).exists():
            raise AlreadyExists(f"VM {vm.id!r} already has volumes for container {container_id!r}")
        await asyncio.to_thread(share.bind, directory, container_id, list(volumes))
    log.info("VM %s: added %d volume(s) of container %s", vm.id, len(volumes), container_id)


async def remove_rootfs(manager: VmManager, vm: Vm, container_id: str) -> None:
    """Have the guest write a further container's rootfs back and unmount it, then unplug and
    release it. On a VM whose QEMU has ended, the VM's release writes the layer back (with a
    helper VM) before its image is dropped, and this answers with that outcome."""
    async with vm.lock:
        rootfs = vm.added.get(container_id)
        if rootfs is None:
            raise NotFound(f"VM {vm.id!r} has no added rootfs for container {container_id!r}")
        alive = vm.phase in ("running", "paused") and vm.machine.ending is None
        if alive and await _remove_from_guest(manager, vm, container_id, rootfs):
            return
    await _removed_with_vm(vm, container_id, rootfs)


async def _qemu_ended(vm: Vm) -> bool:
    """Whether the VM's QEMU has ended (a guest that cannot be reached may be a QEMU that died)."""
    if vm.machine.ending is not None:
        return True
    try:
        async with asyncio.timeout(QEMU_END_GRACE):
            await vm.machine.wait_exit()
    except TimeoutError:
        return False
    return True


async def _remove_from_guest(manager: VmManager, vm: Vm, container_id: str, rootfs: Rootfs) -> bool:
    """The running guest's part of a removal; False if QEMU turned out to have ended first
    (nothing was dropped: the VM's release writes the layer back)."""
    errors = []
    written = True
    if rootfs.writable:
        try:
            # A container still in the guest ends first: nothing writes the layer after it is read.
            await manager.backend.export_upper(vm.machine, container_id, rootfs, final=True)
        except SnapshotGone as e:
            log.warning("VM %s: %s", vm.id, e)
        except Exception as e:
            if guest_unreachable(e):
                if await _qemu_ended(vm):
                    return False
                # Not dropped: the layer stays attached, and the VM's stop writes it back.
                raise Failed(
                    f"the guest of VM {vm.id!r} did not send the writable layer of {container_id!r} "
                    f"({e}); the rootfs stays in the VM, whose stop writes it back"
                ) from None
            log.exception("VM %s: writing back the rootfs of %s failed", vm.id, container_id)
            errors.append(f"writeback: {e}; {kept_where(vm, rootfs)}")
            written = False
            # Refused: its files stay (never deleted unread), and so does the VM's storage.
            vm.exported.add(container_id)
            vm.unwritten[container_id] = str(e)
    try:
        await manager.backend.quiesce_guest(vm.machine, container_id, unmount=True)
    except Exception as e:
        if guest_unreachable(e) and await _qemu_ended(vm):
            return False
        raise Failed(
            f"the guest could not unmount the rootfs of {container_id!r}: {e}"
            + "".join(f"; {error}" for error in errors)
        ) from None
    for serial in vm.state.added_rootfs[container_id]["serials"]:
        try:
            await vm.machine.remove_disk(serial)
        except Exception as e:
            if vm.machine.ending is None:  # an ended QEMU took its disks with it
                errors.append(f"disk {serial}: {e}")
    try:
        if written:
            await rootfs.release()
    except Exception as e:
        errors.append(f"storage: {e}")
    del vm.added[container_id]
    del vm.state.added_rootfs[container_id]
    vm.state.save(vm.runtime_dir)
    if vm.state.share:
        try:
            await asyncio.to_thread(share.unbind, share.share_dir(vm.runtime_dir), container_id)
        except Exception as e:
            errors.append(f"volumes: {e}")
    log.info("VM %s: removed the rootfs of container %s", vm.id, container_id)
    if errors:
        raise Failed(f"removing the rootfs of {container_id!r} from VM {vm.id!r}: " + "; ".join(errors))
    return True


async def _removed_with_vm(vm: Vm, container_id: str, rootfs: Rootfs) -> None:
    """The rootfs of a VM whose QEMU ended goes with the VM's release, which writes it back
    first: wait for that and answer with this container's outcome."""
    log.warning(
        "VM %s ended before the rootfs of container %s was removed; the VM's release writes it back first",
        vm.id,
        container_id,
    )
    assert vm.finished is not None
    failure = ""
    try:
        await asyncio.shield(vm.finished)
    except Exception as e:
        failure = str(e)
    if container_id in vm.saved:
        log.info(
            "VM %s: the rootfs of container %s was written back and removed with the VM", vm.id, container_id
        )
        return
    why = vm.unwritten.get(container_id) or failure or "the VM's release did not reach it"
    raise Failed(
        f"the writable layer of container {container_id!r} could not be written back after VM {vm.id!r} "
        f"ended: {why}; {kept_where(vm, rootfs)} (spinboxctl check names them)"
    )
