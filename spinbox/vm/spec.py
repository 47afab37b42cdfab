"""What a VM is made of: frozen values, validated once at the edge."""

from __future__ import annotations

import fcntl
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from spinbox.host import KERNEL_PACKAGE, newest_cloud_kernel
from spinbox.vm.errors import VmError
from spinbox.vm.handover import UID_BASE

Accel = Literal["auto", "kvm", "tcg"]

DEFAULT_IMAGE = Path("/var/lib/spinbox/guest/initrd.img")

_VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_HOTPLUG_PORTS = 64
# QEMU's own default translation cache under TCG on 64-bit hosts, in MiB.
MAX_TCG_CACHE_MIB = 1024
_SERIAL = re.compile(r"^[A-Za-z0-9_.-]{1,20}$")
# sun_path is 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107
# The size of a template's empty disk slot, which the guest keeps for the disk a restored VM puts
# there (spinbox.vm.template): larger than any image spinbox makes.
SLOT_DISK_BYTES = 1 << 40
# The seals a template's RAM must carry before a restored VM maps it.
SEALED_RAM = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


@dataclass(frozen=True)
class Disk:
    """A host file attached as a virtio-blk device, found in the guest by serial."""

    path: Path
    serial: str
    read_only: bool = True


@dataclass(frozen=True)
class Nic:
    """A virtio-net device backed by an open TAP file descriptor."""

    tap_fd: int
    mac: str


@dataclass(frozen=True)
class MemoryFile:
    """Guest RAM in a memfd: a template's. `shared`: the template being built
    writes it (and it is saved to `path`); otherwise a VM restored from it maps
    it private (copy on write), and it must be sealed against writes."""

    path: Path
    shared: bool
    # The memfd, which QEMU inherits and maps as /proc/self/fd/N: a confined QEMU
    # opens no host path of its own (spinbox.vm.handover).
    fd: int | None = None


@dataclass(frozen=True)
class VmSpec:
    vm_id: str
    kernel: Path
    initrd: Path
    runtime_dir: Path
    vcpus: int = 1
    memory_mib: int = 256
    # The most a resize may give the running VM (spinbox.vm.resize): vCPUs by CPU hotplug,
    # memory by a virtio-mem device; 0 (or the boot size): not resizable.
    max_vcpus: int = 0
    max_memory_mib: int = 0
    kernel_args: tuple[str, ...] = ()
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    accel: Accel = "auto"
    # Spare PCIe root ports for disks hot-plugged later (a pod's further containers).
    hotplug_ports: int = 0
    # QEMU's end of the vhost-user connection to the VM's virtiofsd: a
    # virtio-fs device, and guest RAM in a shared memory backend.
    virtiofs_fd: int | None = None
    qemu: str = "qemu-system-x86_64"
    # QEMU as a uid of its own under -sandbox (spinbox.vm.handover); False only to measure the cost.
    confine: bool = True
    uid_base: int = UID_BASE
    extra_args: tuple[str, ...] = field(default=())
    # Templates: RAM in a file, and (restore) device state from a migration
    # stream on this open fd; disks and NICs are then plugged into the spare
    # ports, as the template was saved without them.
    memory_file: MemoryFile | None = None
    incoming_fd: int | None = None
    # Device slots (templates): the first `disk_slots` hot-plug ports hold virtio-blk devices and
    # the next `nic_slots` virtio-net devices from QEMU's start, backed by the spec's first disks
    # and NICs or by placeholders (spinbox.vm.qemu.slot_layout); further ones are hot-plugged.
    disk_slots: int = 0
    nic_slots: int = 0
    # TCG's translation cache in MiB; 0: spinbox's own for a cold boot or a restore
    # (spinbox.vm.qemu.TCG_TB_SIZE_MIB, TCG_TB_SIZE_RESTORED_MIB).
    tcg_cache_mib: int = 0

    def validate(self) -> None:
        """Raise VmError naming the first thing wrong with this spec."""
        if not _VM_ID.match(self.vm_id):
            raise VmError(
                f"VM id {self.vm_id!r} is not valid: use 1 to 64 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        if not 1 <= self.vcpus <= 255:
            raise VmError(f"vcpus must be between 1 and 255, not {self.vcpus}")
        if not 64 <= self.memory_mib <= 1024 * 1024:
            raise VmError(f"memory_mib must be at least 64 MiB, not {self.memory_mib}")
        if self.max_vcpus and not self.vcpus <= self.max_vcpus <= 255:
            raise VmError(f"max_vcpus must be between vcpus ({self.vcpus}) and 255, not {self.max_vcpus}")
        if self.max_memory_mib and not self.memory_mib <= self.max_memory_mib <= 1024 * 1024:
            raise VmError(
                f"max_memory_mib must be between memory_mib ({self.memory_mib}) and {1024 * 1024}, "
                f"not {self.max_memory_mib}"
            )
        if self.accel not in ("auto", "kvm", "tcg"):
            raise VmError(f"accel must be 'auto', 'kvm' or 'tcg', not {self.accel!r}")
        if not 0 <= self.tcg_cache_mib <= MAX_TCG_CACHE_MIB:
            raise VmError(
                f"the TCG translation cache must be between 1 and {MAX_TCG_CACHE_MIB} MiB "
                f"(0: the default), not {self.tcg_cache_mib}"
            )
        if not 0 <= self.hotplug_ports <= MAX_HOTPLUG_PORTS:
            raise VmError(
                f"hotplug_ports must be between 0 and {MAX_HOTPLUG_PORTS}, not {self.hotplug_ports}"
            )
        check_kernel(self.kernel)
        check_initrd(self.initrd)
        longest = self.runtime_dir / "console.sock"
        if len(str(longest).encode()) > _SUN_PATH_MAX:
            raise VmError(
                f"runtime directory {self.runtime_dir} is too long for unix socket paths "
                f"(at most {_SUN_PATH_MAX - len('/console.sock')} bytes)"
            )
        serials: set[str] = set()
        for disk in self.disks:
            check_disk(disk)
            if disk.serial in serials:
                raise VmError(f"disk serial {disk.serial!r} is used twice")
            serials.add(disk.serial)
        for nic in self.nics:
            if not _MAC.match(nic.mac):
                raise VmError(
                    f"NIC MAC address {nic.mac!r} is not of the form aa:bb:cc:dd:ee:ff (lower case)"
                )
            if nic.tap_fd < 0:
                raise VmError(f"NIC {nic.mac} has no TAP file descriptor")
        if self.virtiofs_fd is not None and self.memory_file is not None:
            # virtiofsd maps guest RAM, which a template's file-backed RAM cannot share with it.
            raise VmError("a VM with a virtio-fs share boots cold: its RAM cannot be a template's")
        if self.incoming_fd is not None and self.memory_file is None:
            raise VmError("a VM restored from a template needs the template's memory file")
        if self.memory_file is not None:
            check_memory_file(self.memory_file, confined=self.confine)
        if self.disk_slots < 0 or self.nic_slots < 0:
            raise VmError("device slots cannot be negative")
        if len(self.nics) < self.nic_slots:
            # virtio-net offers its offloads only with a TAP for a peer, and a restored guest keeps
            # what it negotiated in the template: every slot's NIC needs one.
            raise VmError(f"{self.nic_slots} NIC slots need as many NICs, not {len(self.nics)}")
        for disk in self.disks[: self.disk_slots]:
            size = disk.path.stat().st_size
            if size > SLOT_DISK_BYTES:
                raise VmError(
                    f"disk image {disk.path} ({size} bytes) is larger than a template's disk slot "
                    f"({SLOT_DISK_BYTES} bytes)"
                )
        slots = self.disk_slots + self.nic_slots
        plugged = max(0, len(self.disks) - self.disk_slots) + max(0, len(self.nics) - self.nic_slots)
        if slots and slots + plugged > self.hotplug_ports:
            raise VmError(
                f"{self.disk_slots} disk and {self.nic_slots} NIC slots and {plugged} further devices "
                f"do not fit in {self.hotplug_ports} spare PCIe ports"
            )
        if self.incoming_fd is not None and len(self.disks) + len(self.nics) > self.hotplug_ports:
            raise VmError(
                f"{len(self.disks)} disks and {len(self.nics)} NICs do not fit in "
                f"{self.hotplug_ports} spare PCIe ports"
            )
        for arg in self.kernel_args:
            if not arg or any(c.isspace() for c in arg):
                raise VmError(f"kernel argument {arg!r} is empty or contains white space")


def check_memory_file(memory: MemoryFile, *, confined: bool) -> None:
    """A confined QEMU gets its RAM as a descriptor; a restored VM's RAM is sealed against writes."""
    if memory.fd is None:
        if confined:
            raise VmError(
                f"guest RAM {memory.path} must be handed to a confined QEMU as a descriptor (a memfd)"
            )
        return
    if memory.shared:
        return
    try:
        seals = fcntl.fcntl(memory.fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if seals & SEALED_RAM != SEALED_RAM:
        raise VmError(
            f"the template's RAM ({memory.path}) handed to a restored VM is not a memfd sealed against "
            "writes, shrinking and growing: a VM could change what every other VM restored from it maps"
        )


def check_disk(disk: Disk) -> None:
    if not _SERIAL.match(disk.serial):
        raise VmError(
            f"disk serial {disk.serial!r} is not valid: use 1 to 20 letters, digits, '_', '.' or '-'"
        )
    if not disk.path.exists():
        raise VmError(f"disk image {disk.path} does not exist")


def check_kernel(path: Path) -> None:
    if not path.is_file():
        raise VmError(
            f"guest kernel {path} does not exist: install Debian's cloud kernel "
            f"(apt install {KERNEL_PACKAGE}) or point the VM at another kernel"
        )


def check_initrd(path: Path) -> None:
    if not path.is_file():
        raise VmError(f"guest image {path} does not exist: build it with `spinbox-mkguest --output {path}`")


def default_kernel(boot: Path = Path("/boot")) -> Path:
    """The newest installed Debian cloud kernel (linux-image-cloud-amd64)."""
    kernel = newest_cloud_kernel(boot)
    if kernel is None:
        raise VmError(
            f"no Debian cloud kernel in {boot} (vmlinuz-*-cloud-amd64): "
            f"install it with `apt install {KERNEL_PACKAGE}`"
        )
    return kernel
