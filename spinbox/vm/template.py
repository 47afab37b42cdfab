"""VM templates: a guest booted once to agent-ready and saved, and VMs restored from it.

A template's RAM is a memfd that its QEMU (confined like any VM's) maps
shared and writes; once saved, its data is kept in a file on tmpfs. Its device
state is QEMU's migration stream, saved to a second file with x-ignore-shared
(the RAM is not copied into it). spinboxd loads the RAM file into a memfd of
its own and seals it against every change (`load_ram`): the VMs restored from
the template map that memfd private (copy on write: the template's pages count
once on the host however many VMs use them). A restored VM is a QEMU of its
own, confined like a cold-booted one: it receives the sealed memfd and opens
it as /proc/self/fd/N (QEMU 7.2's memory-backend-file opens its mem-path
read-write; a memfd's inode is mode 0777, and its seals, not the permission,
refuse writes, hole punching and size changes). A VM therefore cannot change
what other VMs map, and QEMU's discard of a page the guest freed (free page
reporting punches a hole in a file-backed RAM's file, shared or not) fails
instead of zeroing the template under every VM restored from it. The restored
guest stops reporting free pages (vminitd, on Refresh): its private pages stay
with it until it stops.

A restored VM never boots its kernel, but QEMU reads the whole file it is
given as -kernel into memory of its own (14 MiB for Debian's cloud kernel) and
keeps it for the VM's life. A template therefore keeps the kernel's boot
header (`kernel_header`: the setup sectors of its bzImage, about 20 KiB) as a
third file, and a restored VM is given that instead: QEMU still sets up the
same machine (its linuxboot option ROM is part of the device state), with no
kernel to hold.

A restored VM loads the device state and continues from agent-ready. Before
anything else runs in it, the guest mixes a seed from the host into its
entropy pool and reseeds its CRNG, and takes the host's clock.

Device slots: probing a hot-plugged device (PCI hotplug, virtio probe, block
or net registration) is kernel work every restored guest would repeat, and
under TCG the code for it is translated afresh in each VM. A template
therefore boots with its first spare ports holding `disk_slots` virtio-blk
devices and `nic_slots` virtio-net devices, backed by placeholders (a
null-co disk of SLOT_DISK_BYTES that reads zeros; a NIC with SLOT_MAC whose
peer is a TAP alone in a network namespace of its own, because virtio-net
offers the guest checksum and segmentation offloads only with a TAP for a
peer, and the guest keeps what it negotiated then). QEMU's migration
carries devices' state, not their backends: a restored VM's QEMU names
the same devices at the same ports, backed by the VM's own disk images and
TAPs, and the guest finds them already probed. What the guest kept from
the placeholders, it corrects or never uses:
- a disk's serial is read from QEMU at each read of sysfs (virtio-blk's
  GET_ID request): the guest sees the VM's serials;
- a disk's size is the one read at the template's boot (virtio_blk reads it
  again only on a configuration interrupt): the placeholder is larger than
  any image spinbox makes, a file system reads only its own blocks, and a
  read past the real image's end fails in QEMU (a VM whose disk is larger
  than a slot boots cold: spinbox.daemon.templates);
- the blocks the template's kernel read (its partition scan) are dropped
  before a mount (vminitd, BLKFLSBUF);
- a NIC's MAC is part of virtio-net's state, so the guest still has the
  template's: vminitd gives the first slot NIC the MAC of the VM's first
  interface (its virtio control queue tells QEMU, whose receive filter
  follows), which is the MAC of the TAP's interface on the host;
- a disk slot the VM does not use keeps its placeholder: no disk has its
  serial, so the guest never mounts it. A VM with fewer NICs than the
  template has NIC slots boots cold (spinbox.daemon.templates): an empty
  slot would need a TAP of its own, and with networking on every VM has one.
Devices beyond the slots are plugged into the ports after them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from spinbox.vm import control
from spinbox.vm.errors import VmError
from spinbox.vm.machine import VirtualMachine, launch
from spinbox.vm.process import Spawn
from spinbox.vm.qemu import SLOT_MAC, hotplug_port, port_layout, slot_serial
from spinbox.vm.spec import SEALED_RAM, MemoryFile, VmSpec

# Seconds QEMU may take to write or read a template's device state (~120 KB).
MIGRATION_TIMEOUT = 60.0
# Seconds the guest may take to answer Refresh.
REFRESH_TIMEOUT = 30.0
SEED_BYTES = 64
_STATE_FD_NAME = "template-state"
_IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
# A restored VM's RAM: nothing may write, punch, shrink or grow it, nor lift the seals.
RAM_SEALS = SEALED_RAM | fcntl.F_SEAL_SEAL
_PAGE = 4096
_CHUNK = 1 << 20
# Linux's x86 boot protocol: the setup sectors' count (0 means 4) and the header's magic.
_SETUP_SECTS = 0x1F1
_HEADER_MAGIC_AT = 0x202
_HEADER_MAGIC = b"HdrS"
_SECTOR = 512


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

    @property
    def kernel_header(self) -> Path:
        return self.root / "kernel-header"


def new_ram(name: str, size: int) -> int:
    """An empty memfd of `size` bytes that can be sealed later: a template's RAM while it is built."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def copy_data(source: int, target: int, size: int) -> int:
    """Copy source's data into target (same size, empty): only its data extents (SEEK_DATA,
    SEEK_HOLE), and of those only the pages that are not all zeros. Returns the bytes written."""
    zero = bytes(_PAGE)
    written = 0
    offset = 0
    while offset < size:
        try:
            start = os.lseek(source, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # no data after offset
                break
            raise
        end = min(os.lseek(source, start, os.SEEK_HOLE), size)
        position = start
        while position < end:
            chunk = os.pread(source, min(_CHUNK, end - position), position)
            if not chunk:
                break
            view = memoryview(chunk)
            page = 0
            while page < len(chunk):
                if view[page : page + _PAGE] == zero:
                    page += _PAGE
                    continue
                run = page
                while run < len(chunk) and view[run : run + _PAGE] != zero:
                    run += _PAGE
                written += os.pwrite(target, view[page:run], position + page)
                page = run
            position += len(chunk)
        offset = end
    return written


def load_ram(files: TemplateFiles) -> int:
    """A memfd holding the template's RAM, sealed with RAM_SEALS: what restored VMs map.

    Blocking (a copy of the template's data): run it in a thread.
    """
    try:
        source = os.open(files.ram, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise VmError(f"cannot read the template's RAM {files.ram}: {error.strerror}") from None
    try:
        size = os.fstat(source).st_size
        if size <= 0 or size % _PAGE:
            raise VmError(f"the template's RAM {files.ram} has a size of {size} bytes, not whole pages")
        ram = new_ram(f"spinbox-template-{files.root.name}", size)
        try:
            copy_data(source, ram, size)
            fcntl.fcntl(ram, fcntl.F_ADD_SEALS, RAM_SEALS)
        except OSError as error:
            os.close(ram)
            raise VmError(f"cannot load the template's RAM {files.ram}: {error.strerror}") from None
        except BaseException:
            os.close(ram)
            raise
        return ram
    finally:
        os.close(source)


def kernel_header(kernel: Path) -> bytes:
    """The boot sector and setup sectors of a bzImage: what QEMU's -kernel needs to set up a
    machine whose guest is already running (VmError when `kernel` is no bzImage)."""
    try:
        with open(kernel, "rb") as image:
            head = image.read(_SETUP_SECTS + 1)
            if len(head) <= _SETUP_SECTS:
                raise VmError(f"the guest kernel {kernel} is too short to be a bzImage")
            size = ((head[_SETUP_SECTS] or 4) + 1) * _SECTOR
            image.seek(0)
            header = image.read(size)
    except OSError as error:
        raise VmError(f"cannot read the guest kernel {kernel}: {error.strerror}") from None
    if len(header) < size or header[_HEADER_MAGIC_AT : _HEADER_MAGIC_AT + 4] != _HEADER_MAGIC:
        raise VmError(f"the guest kernel {kernel} is not a bzImage (no Linux boot header)")
    return header


def _save_kernel_header(kernel: Path, path: Path) -> None:
    header = kernel_header(kernel)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, header)
        # QEMU runs as another user and opens it (through /proc/self/fd) itself.
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)


def _save_ram(ram: int, path: Path) -> None:
    """The built template's RAM (a memfd) into a file, sparse."""
    size = os.fstat(ram).st_size
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        copy_data(ram, fd, size)
    finally:
        os.close(fd)


async def build(spec: VmSpec, files: TemplateFiles, spawn: Spawn | None, boot_timeout: float) -> None:
    """Boot spec's guest (no disks, no NICs) to agent-ready, save it into `files` and stop it."""
    if spec.disks or len(spec.nics) != spec.nic_slots:
        raise VmError("a template is saved without disks, and with NICs in its NIC slots only")
    files.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path in (files.ram, files.state, files.kernel_header):
        path.unlink(missing_ok=True)
    # Before the boot: a kernel QEMU cannot restore from fails the build, not every restore.
    _save_kernel_header(spec.kernel, files.kernel_header)
    ram = new_ram(f"spinbox-{spec.vm_id}", spec.memory_mib << 20)
    try:
        spec = dataclasses.replace(spec, memory_file=MemoryFile(files.ram, shared=True, fd=ram))
        await _build(spec, files, spawn, boot_timeout)
        await asyncio.to_thread(_save_ram, ram, files.ram)
    finally:
        os.close(ram)


async def _build(spec: VmSpec, files: TemplateFiles, spawn: Spawn | None, boot_timeout: float) -> None:
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
        # No writable shared mapping of the RAM may outlive the build (it would keep the seals off).
        await vm.wait_exit()


async def restore(spec: VmSpec, files: TemplateFiles, ram: int, spawn: Spawn | None) -> VirtualMachine:
    """A VM for spec restored from the template in `files` (its RAM: `ram`, from load_ram),
    refreshed, its disks and NICs in the template's slots or plugged after them."""
    try:
        fd = os.open(files.state, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise VmError(f"cannot read the template's device state {files.state}: {error.strerror}") from None
    # QEMU inherits its own copy of the memfd, as a descriptor it may keep.
    ram_fd = os.dup(ram)
    try:
        memory = MemoryFile(files.ram, shared=False, fd=ram_fd)
        spec = dataclasses.replace(spec, memory_file=memory, incoming_fd=fd, kernel=files.kernel_header)
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
        # The agent answered: asking it again (Ping) would cost a round trip into the guest.
        vm.agent_answered()
        await _plug_devices(vm, spec)
    except BaseException:
        await vm.kill()
        raise
    return vm


async def _refresh(vm: VirtualMachine, warm: bool = False) -> None:
    seed = os.urandom(SEED_BYTES)
    try:
        async with asyncio.timeout(REFRESH_TIMEOUT):
            await control.session(vm.control_address, lambda agent: agent.refresh(seed, time.time_ns(), warm))
    except TimeoutError:
        raise VmError(f"VM {vm.vm_id}'s agent did not answer Refresh within {REFRESH_TIMEOUT:g} s") from None
    except VmError:
        raise
    except Exception as error:
        raise VmError(f"VM {vm.vm_id}'s agent failed to refresh its entropy and clock: {error}") from None


async def _plug_devices(vm: VirtualMachine, spec: VmSpec) -> None:
    """The disks, then the NICs, that no slot holds into the spare ports after the slots
    (QemuCommand named their backends); the slots are recorded as in use."""
    layout = port_layout(spec)
    for index in range(spec.disk_slots):
        name = spec.disks[index].serial if index < len(spec.disks) else slot_serial(index)
        vm.mark_plugged(hotplug_port(index), name)
    for index in range(spec.nic_slots):
        mac = spec.nics[index].mac if index < len(spec.nics) else SLOT_MAC
        vm.mark_plugged(hotplug_port(spec.disk_slots + index), f"nic:{mac}")
    for index, disk in enumerate(spec.disks):
        if index < spec.disk_slots:
            continue
        port = hotplug_port(layout.disks[index])
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
        if index < spec.nic_slots:
            continue
        port = hotplug_port(layout.nics[index])
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
