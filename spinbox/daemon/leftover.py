"""Cleaning up after a VM that a previous spinboxd left dead (a crash)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from spinbox.daemon.keep import keep_or_remove
from spinbox.daemon.options import check_vm_id
from spinbox.daemon.process import pid_alive
from spinbox.daemon.state import VmState
from spinbox.daemon.systemd import scope_name

if TYPE_CHECKING:
    from spinbox.daemon.manager import VmManager

log = logging.getLogger(__name__)


async def remove_leftover(manager: VmManager, vm_id: str, state: VmState | None, directory: Path) -> None:
    """Its QEMU, scope and network go; its writable layers are written back (by a
    helper VM) where they can be, and kept and named where they cannot."""
    if (
        state is not None
        and state.pid
        and pid_alive(state.pid)
        and await manager.systemd.scope_of_pid(state.pid) == state.scope
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
                except Exception:
                    log.exception("writing back the rootfs of %s (VM %s) failed", container_id, vm_id)
                    unwritten.append(container_id)
                    continue
            with contextlib.suppress(Exception):
                await rootfs.release()
        # The removal unmounts first: a mount a crash left must neither block it
        # nor have its source's files removed through it.
        await keep_or_remove(manager.kept, state.storage_dir, vm_id, unwritten)
    shutil.rmtree(directory, ignore_errors=True)
