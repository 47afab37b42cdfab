"""Writing back the writable layer of a VM whose QEMU ended before its guest could stream it.

The layer's ext4 image was written by the guest and is never mounted or
parsed on the host: a helper VM (the same kernel, guest image, confinement
and scope name as the VM it stands in for) attaches it as its only disk,
mounts it and streams its upper directory, which spinboxd checks like any
guest's stream. The helper has no network and lives only as long as that.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from spinbox.daemon.backend import Backend, Machine, Rootfs
from spinbox.daemon.logs import JournalSink, LogForwarder
from spinbox.daemon.spawn import ScopeSpawner, make_fifo, qemu_log_fifo
from spinbox.daemon.systemd import ScopeLimits, SystemdManager, scope_name

log = logging.getLogger(__name__)

HELPER_VCPUS = 1
HELPER_MEMORY_MIB = 256


async def write_back_with_helper(
    systemd: SystemdManager,
    backend: Backend,
    run_dir: Path,
    vm_id: str,
    container_id: str,
    rootfs: Rootfs,
    overhead_mib: int,
) -> None:
    """Boot a helper VM on the layer's disk and write its stream into the snapshot.
    The VM's own scope must be gone: the helper takes its name."""
    runtime_dir = run_dir / "writeback" / vm_id
    shutil.rmtree(runtime_dir, ignore_errors=True)
    runtime_dir.mkdir(parents=True, mode=0o700)
    scope = scope_name(vm_id)
    forwarder = LogForwarder(JournalSink(vm_id, scope), qemu_log_fifo(runtime_dir))
    make_fifo(qemu_log_fifo(runtime_dir))
    forwarder.start_fifo()
    limits = ScopeLimits.for_vm(HELPER_VCPUS, HELPER_MEMORY_MIB, overhead_mib)
    spawner = ScopeSpawner(
        systemd, vm_id, runtime_dir, limits, f"spinbox VM {vm_id}: writing back container {container_id}"
    )

    def launched(machine: Machine) -> None:
        forwarder.sink.pid = machine.pid
        forwarder.start_sockets(machine.console_socket, machine.log_socket)

    log.warning(
        "VM %s ended before its guest sent the writable layer of container %s; reading it with a helper VM",
        vm_id,
        container_id,
    )
    try:
        await backend.rescue_upper(vm_id, rootfs, runtime_dir, spawner, launched)
    finally:
        forwarder.sink.pid = 0
        await forwarder.stop()
        await spawner.abort()
        shutil.rmtree(runtime_dir, ignore_errors=True)
    log.info("VM %s: the writable layer of container %s was written back by a helper VM", vm_id, container_id)
