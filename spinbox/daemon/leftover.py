"""At spinboxd start: re-adopting the VMs a previous spinboxd left running, and
cleaning up after those it left dead (a crash) once spinboxd serves again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
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
from spinbox.vm.ending import Ending

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


@dataclass(frozen=True)
class Leftover:
    """A VM a previous spinboxd left dead or half made (its state may be unreadable: None)."""

    vm_id: str
    state: VmState | None
    directory: Path


async def recover(manager: VmManager) -> list[Leftover]:
    """Re-adopt the VMs a previous spinboxd left running (quick: spinboxd does it before it takes
    its bus name), and return the rest, for clean_up once spinboxd serves (their writebacks boot
    helper VMs). Meanwhile their ids are in manager.recovering, and their network and storage
    are theirs: collected by nothing else."""
    from spinbox.daemon.manager import Vm  # the manager imports this module

    vm_root = manager.run_dir / "vm"
    vm_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    leftovers = []
    for directory in sorted(vm_root.iterdir()):
        try:
            state = VmState.load(directory)
        except (OSError, ValueError, TypeError) as e:
            log.warning("removing %s: unreadable VM state (%s)", directory, e)
            leftovers.append(Leftover(directory.name, None, directory))
            continue
        alive = (
            state.phase in ("running", "paused")
            and state.pid > 0
            and pid_alive(state.pid)
            and await manager.systemd.scope_of_pid(state.pid) == state.scope
        )
        if not alive:
            leftovers.append(Leftover(state.id, state, directory))
            continue
        try:
            machine = await manager.backend.attach(directory)
        except Exception:
            log.exception("cannot re-adopt VM %s; stopping it", state.id)
            leftovers.append(Leftover(state.id, state, directory))
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
    for leftover in leftovers:
        manager.recovering[leftover.vm_id] = asyncio.Event()
        left = leftover.state
        if left is not None and left.phase in ("running", "paused"):
            # Its shim may ask how it ended before it is cleaned up.
            manager.endings.record(leftover.vm_id, Ending(None), left.pid)
    known = [*manager.vms, *manager.recovering]
    name_orphans(manager.storage_dir, known, manager.kept)
    try:
        await manager.backend.collect_network_leftovers(sorted(known))
    except Exception:
        log.exception("collecting network leftovers failed")
    return leftovers


async def clean_up(manager: VmManager, leftovers: list[Leftover]) -> None:
    """Clean up the VMs a previous spinboxd left dead or half made, one by one, while spinboxd
    serves; then collect the layer cache. A VM's id leaves manager.recovering once it is done
    (its waiters are then answered). Cancelled (spinboxd stopping), what is left stays for the
    next spinboxd, and its waiters get no answer from this one."""
    for leftover in leftovers:
        if leftover.state is not None:
            log.warning(
                "cleaning up VM %s left %s by a previous spinboxd", leftover.vm_id, leftover.state.phase
            )
        try:
            await remove_leftover(manager, leftover.vm_id, leftover.state, leftover.directory)
        except Exception:
            log.exception("cleaning up after VM %s failed", leftover.vm_id)
        done = manager.recovering.pop(leftover.vm_id, None)
        if done is not None:
            done.set()
    if leftovers:
        log.info("cleaned up the %d VM(s) a previous spinboxd left", len(leftovers))
    try:
        await manager.backend.collect_storage_leftovers()
    except Exception:
        log.exception("collecting storage leftovers failed")
