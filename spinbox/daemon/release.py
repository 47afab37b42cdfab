"""Everything after a VM's QEMU ended: each writable layer goes back into its snapshot
(streamed by the guest at stop, or read by a helper VM when the guest could not), and only
then are the layer's image, the network, the scope, the files and the bus object given back.

A layer that could not be written back is never dropped: its image and the VM's storage
directory stay, named in the journal, in the error and in `spinboxctl check`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from spinbox.daemon import share
from spinbox.daemon.backend import Rootfs
from spinbox.daemon.errors import Failed
from spinbox.daemon.keep import keep_or_remove
from spinbox.storage.errors import SnapshotGone, StorageError
from spinbox.vm.control import connection_lost

if TYPE_CHECKING:
    from spinbox.daemon.manager import Vm, VmManager

log = logging.getLogger("spinbox.daemon.manager")


def guest_unreachable(error: BaseException) -> bool:
    """Whether a writeback failed because the guest could not be reached (QEMU ended, or the
    guest stopped answering), not because the layer or the snapshot refused it: a helper VM
    reading the layer's disk may then still succeed."""
    return not isinstance(error, StorageError) and (connection_lost(error) or isinstance(error, TimeoutError))


def kept_where(vm: Vm, rootfs: Rootfs) -> str:
    """Where an unwritten layer stays, as words."""
    image = rootfs.upper_image
    disk = f"its disk image {image} and " if image is not None else ""
    return f"{disk}the VM's storage directory {vm.state.storage_dir or '(none)'} are kept"


async def export_at_stop(manager: VmManager, vm: Vm, container_id: str, rootfs: Rootfs) -> None:
    """The guest ends the container and streams its layer one last time (what its processes
    wrote up to their end is in it); if it cannot (QEMU died), a helper VM will."""
    if not rootfs.writable:
        return
    try:
        await manager.backend.export_upper(vm.machine, container_id, rootfs, final=True)
    except SnapshotGone as e:
        log.warning("VM %s: %s", vm.id, e)
        vm.exported.add(container_id)
    except Exception as e:
        if guest_unreachable(e):
            log.warning("VM %s: the guest did not send the writable layer of %s: %s", vm.id, container_id, e)
            return
        # Refused, or the guest answered that it cannot: reading the disk again would not change that.
        log.error("VM %s: the writable layer of %s: %s", vm.id, container_id, e)
        vm.writeback_errors.append(f"writeback of container {container_id!r}: {e}")
        vm.exported.add(container_id)
        vm.unwritten[container_id] = str(e)
    else:
        vm.exported.add(container_id)


async def release(manager: VmManager, vm: Vm) -> None:
    """Everything after QEMU ended: logs, writable layers, network, scope, files, object."""
    if vm.phase != "stopping":
        manager._set_phase(vm, "stopping")
    await vm.forwarder.stop()
    errors = list(vm.writeback_errors)
    # A pod member's RemoveRootfs under way ends first; the rootfses left are this release's.
    async with vm.lock:
        rootfses = vm.rootfses()
        unsent = {
            cid: rootfs for cid, rootfs in rootfses.items() if rootfs.writable and cid not in vm.exported
        }
        if unsent:
            # The helper VM takes the scope's name.
            await manager.systemd.stop_unit(vm.state.scope)
            await manager.systemd.wait_gone(vm.state.scope)
        for container_id, rootfs in unsent.items():
            try:
                await manager._write_back_with_helper(vm.id, container_id, rootfs)
            except SnapshotGone as e:
                log.warning("VM %s: %s", vm.id, e)
            except Exception as e:
                log.exception("writing back the rootfs of %s (VM %s) failed", container_id, vm.id)
                errors.append(f"writeback of container {container_id!r}: {e}")
                vm.unwritten[container_id] = str(e)
        for container_id, rootfs in rootfses.items():
            if container_id in vm.unwritten:
                # Never deleted unread.
                log.error(
                    "VM %s: the writable layer of %s was not written back: %s",
                    vm.id,
                    container_id,
                    kept_where(vm, rootfs),
                )
                continue
            vm.saved.add(container_id)
            try:
                await rootfs.release()
            except Exception as e:
                errors.append(f"storage: {e}")
    if vm.state.network:
        try:
            await manager.backend.teardown_network(vm.id)
        except Exception as e:
            errors.append(f"network: {e}")
    if vm.port_forward is not None:
        vm.port_forward.close()
        vm.port_forward = None
    await keep_or_remove(manager.kept, vm.state.storage_dir, vm.id, vm.unwritten)
    await manager.systemd.stop_unit(vm.state.scope)
    await manager.systemd.wait_gone(vm.state.scope)
    await asyncio.to_thread(share.remove_runtime_dir, vm.runtime_dir)
    manager._set_phase(vm, "stopped")
    manager.vms.pop(vm.id, None)
    if manager.publisher is not None:
        manager.publisher.unpublish(vm)
    manager._count_changed()
    if errors:
        raise Failed("; ".join(errors))
