"""VM templates: a guest booted once to agent-ready and saved, and VMs restored from it.

A template's RAM is a file on tmpfs that its QEMU maps shared and writes; its
device state is QEMU's migration stream, saved to a second file with
x-ignore-shared (the RAM file is not copied into it). A VM restored from the
template is a QEMU of its own that maps the RAM file private (copy on write:
the template's pages count once on the host however many VMs use them),
loads the device state and continues from agent-ready. Before anything else
runs in it, the guest mixes a seed from the host into its entropy pool and
reseeds its CRNG, and takes the host's clock; then the VM's disks and NICs are
plugged into its spare PCIe ports (the template was saved without any).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from spinbox.vm import control
from spinbox.vm.errors import VmError
from spinbox.vm.machine import VirtualMachine, launch
from spinbox.vm.process import Spawn
from spinbox.vm.qemu import hotplug_port
from spinbox.vm.spec import MemoryFile, VmSpec

# Seconds QEMU may take to write or read a template's device state (~120 KB).
MIGRATION_TIMEOUT = 60.0
# Seconds the guest may take to answer Refresh.
REFRESH_TIMEOUT = 30.0
SEED_BYTES = 64
_STATE_FD_NAME = "template-state"
_IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}


@dataclass(frozen=True)
class TemplateFiles:
    """A template's files: the guest's RAM and QEMU's device state."""

    root: Path

    @property
    def ram(self) -> Path:
        return self.root / "ram"

    @property
    def state(self) -> Path:
        return self.root / "state"


async def build(spec: VmSpec, files: TemplateFiles, spawn: Spawn | None, boot_timeout: float) -> None:
    """Boot spec's guest (no disks, no NICs) to agent-ready, save it into `files` and stop it."""
    if spec.disks or spec.nics:
        raise VmError("a template is saved without disks and NICs (they are plugged into each restored VM)")
    files.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path in (files.ram, files.state):
        path.unlink(missing_ok=True)
    spec = dataclasses.replace(spec, memory_file=MemoryFile(files.ram, shared=True))
    vm = await launch(spec, spawn)
    try:
        await vm.wait_ready(boot_timeout)
        # Waits for the guest's deferred devices and loads the agent's halves:
        # every restored VM starts from there.
        await _refresh(vm, warm=True)
        await vm.pause()
        await vm.execute("migrate-set-capabilities", _IGNORE_SHARED)
        fd = os.open(files.state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await vm.send_fd(_STATE_FD_NAME, fd)
        finally:
            os.close(fd)
        await vm.execute("migrate", {"uri": f"fd:{_STATE_FD_NAME}"})
        await _wait_migration(vm, "saving the template")
    finally:
        await vm.kill()


async def restore(spec: VmSpec, files: TemplateFiles, spawn: Spawn | None) -> VirtualMachine:
    """A VM for spec restored from the template in `files`, refreshed, its disks and NICs plugged."""
    fd = os.open(files.state, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ram_fd = os.open(files.ram, os.O_RDWR | os.O_CLOEXEC)
    except BaseException:
        os.close(fd)
        raise
    try:
        memory = MemoryFile(files.ram, shared=False, fd=ram_fd)
        spec = dataclasses.replace(spec, memory_file=memory, incoming_fd=fd)
        vm = await launch(spec, spawn, start=False)
    finally:
        os.close(fd)  # QEMU has its own copies
        os.close(ram_fd)
    try:
        await vm.execute("migrate-set-capabilities", _IGNORE_SHARED)
        await vm.execute("migrate-incoming", {"uri": f"fd:{fd}"})
        await _wait_migration(vm, "restoring the template")
        vm.state.stamps["restored"] = time.monotonic()
        await vm.resume()
        await _refresh(vm)
        vm.state.stamps["refreshed"] = time.monotonic()
        await _plug_devices(vm, spec)
    except BaseException:
        await vm.kill()
        raise
    return vm


async def _refresh(vm: VirtualMachine, warm: bool = False) -> None:
    seed = os.urandom(SEED_BYTES)
    try:
        await asyncio.wait_for(
            control.session(vm.control_address, lambda agent: agent.refresh(seed, time.time_ns(), warm)),
            REFRESH_TIMEOUT,
        )
    except TimeoutError:
        raise VmError(f"VM {vm.vm_id}'s agent did not answer Refresh within {REFRESH_TIMEOUT:g} s") from None
    except VmError:
        raise
    except Exception as error:
        raise VmError(f"VM {vm.vm_id}'s agent failed to refresh its entropy and clock: {error}") from None


async def _plug_devices(vm: VirtualMachine, spec: VmSpec) -> None:
    """The disks, then the NICs, into the first spare ports (QemuCommand named their backends)."""
    for index, disk in enumerate(spec.disks):
        port = hotplug_port(index)
        await vm.execute(
            "device_add",
            {
                "driver": "virtio-blk-pci",
                "id": f"{port}-blk",
                "drive": f"{port}-drive",
                "serial": disk.serial,
                "bus": port,
            },
        )
        vm.mark_plugged(port, disk.serial)
    for index, nic in enumerate(spec.nics):
        port = hotplug_port(len(spec.disks) + index)
        await vm.execute(
            "device_add",
            {
                "driver": "virtio-net-pci",
                "id": f"nic{index}",
                "netdev": f"net{index}",
                "mac": nic.mac,
                "bus": port,
            },
        )
        vm.mark_plugged(port, f"nic:{nic.mac}")


async def _wait_migration(vm: VirtualMachine, what: str, timeout: float = MIGRATION_TIMEOUT) -> None:  # noqa: ASYNC109
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = await vm.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            detail = info.get("error-desc", status)
            raise VmError(f"VM {vm.vm_id}: {what} failed: {detail}")
        if loop.time() > deadline:
            raise VmError(f"VM {vm.vm_id}: {what} did not finish within {timeout:g} s (migration {status})")
        await asyncio.sleep(0.01)
