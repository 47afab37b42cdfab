"""At spinboxd start: re-adopting the VMs a previous spinboxd left running, and
cleaning up after those it left dead (a crash)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from spinbox.daemon import share
from spinbox.daemon.backend import Rootfs
from spinbox.daemon.keep import keep_or_remove, name_orphans
from spinbox.daemon.options import check_vm_id
from spinbox.daemon.process import pid_alive
from spinbox.daemon.state import VmState
from spinbox.daemon.systemd import scope_name
from spinbox.storage.errors import SnapshotGone

if TYPE_CHECKING:
    from spinbox.daemon.manager import VmManager

log = logging.getLogger(__name__)


async def _stop_in_order(manager: VmManager, vm_id: str, state: VmState, directory: Path) -> bool:
    """Stop a leftover VM whose QEMU still runs (spinboxd died creating or
    stopping it) the way a stop does: the guest syncs its disks and powers off,
    so that what its containers wrote reaches the writable layer read next.
    False if it could not be reached (it is then killed)."""
    if state.phase not in ("creating", "stopping"):
        return False
    try:
        machine = await manager.backend.attach(directory)
    except Exception as e:
        log.warning("VM %s: cannot reach its QEMU (pid %d) to stop it in order: %s", vm_id, state.pid, e)
        return False
    try:
        await machine.shutdown(manager.config.timeouts.agent_call)
    except Exception as e:
        log.warning("VM %s: stopping it in order failed: %s", vm_id, e)
        return False
    log.info("VM %s: stopped in order (%s)", vm_id, getattr(machine.ending, "reason", "QEMU ended"))
    return True


async def remove_leftover(manager: VmManager, vm_id: str, state: VmState | None, directory: Path) -> None:
    """Its QEMU, scope and network go; its writable layers are written back (by a
    helper VM) where they can be, and kept and named where they cannot."""
    if (
        state is not None
        and state.pid
        and pid_alive(state.pid)
        and await manager.systemd.scope_of_pid(state.pid) == state.scope
        and not await _stop_in_order(manager, vm_id, state, directory)
    ):
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, signal.SIGKILL)
    try:
        check_vm_id(vm_id)
        await manager.systemd.stop_unit(scope_name(vm_id))
        await manager.systemd.wait_gone(scope_name(vm_id))
        await manager.backend.teardown_network(vm_id)
    except Exception:
        log.exception("cleaning up after VM %s failed", vm_id)
    if state is not None and state.storage_dir:
        unwritten = []
        for container_id in [state.container_id, *state.added_rootfs]:
            rootfs = manager.backend.restore_rootfs(Path(state.storage_dir), container_id)
            if rootfs is None:
                continue
            if rootfs.writable:
                try:
                    await manager._write_back_with_helper(vm_id, container_id, rootfs)
                except SnapshotGone as e:
                    log.warning("VM %s: %s", vm_id, e)
                except Exception:
                    log.exception("writing back the rootfs of %s (VM %s) failed", container_id, vm_id)
                    unwritten.append(container_id)
                    continue
            try:
                await rootfs.release()
            except Exception:
                # Written back already: what stays is cache references and files, no user data.
                log.exception(
                    "releasing the rootfs of %s (VM %s) failed: its files stay", container_id, vm_id
                )
        # The removal unmounts first: a mount a crash left must neither block it
        # nor have its source's files removed through it.
        await keep_or_remove(manager.kept, state.storage_dir, vm_id, unwritten)
    # The share's volumes are unmounted first: nothing is removed through them.
    await asyncio.to_thread(share.remove_runtime_dir, directory)


async def recover(manager: VmManager) -> None:
    """Re-adopt the VMs a previous spinboxd left running; clean up the rest."""
    from spinbox.daemon.manager import Vm  # the manager imports this module

    vm_root = manager.run_dir / "vm"
    vm_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for directory in sorted(vm_root.iterdir()):
        try:
            state = VmState.load(directory)
        except (OSError, ValueError, TypeError) as e:
            log.warning("removing %s: unreadable VM state (%s)", directory, e)
            await manager._remove_leftover(directory.name, None, directory)
            continue
        alive = (
            state.phase in ("running", "paused")
            and state.pid > 0
            and pid_alive(state.pid)
            and await manager.systemd.scope_of_pid(state.pid) == state.scope
        )
        if not alive:
            log.warning("cleaning up VM %s left %s by a previous spinboxd", state.id, state.phase)
            await manager._remove_leftover(state.id, state, directory)
            continue
        try:
            machine = await manager.backend.attach(directory)
        except Exception:
            log.exception("cannot re-adopt VM %s; stopping it", state.id)
            await manager._remove_leftover(state.id, state, directory)
            continue
        forwarder = manager._forwarder(state.id, directory, machine)
        rootfs = None
        added: dict[str, Rootfs] = {}
        if state.storage_dir:
            rootfs = manager.backend.restore_rootfs(Path(state.storage_dir), state.container_id)
            for container_id in state.added_rootfs:
                restored = manager.backend.restore_rootfs(Path(state.storage_dir), container_id)
                if restored is not None:
                    added[container_id] = restored
        vm = Vm(state, directory, machine, rootfs, forwarder, added=added)
        state.save(directory)  # in this release's layout (an upgrade may have left two files)
        manager._adopt(vm)
        log.info("re-adopted VM %s (QEMU pid %d)", state.id, state.pid)
    name_orphans(manager.storage_dir, manager.vms, manager.kept)
    try:
        await manager.backend.collect_network_leftovers(sorted(manager.vms))
    except Exception:
        log.exception("collecting network leftovers failed")
    try:
        await manager.backend.collect_storage_leftovers()
    except Exception:
        log.exception("collecting storage leftovers failed")
