"""The QEMU command line for a VmSpec."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from spinbox.vm.accel import choose_accel
from spinbox.vm.handover import SANDBOX, Handover, VmUser
from spinbox.vm.spec import SLOT_DISK_BYTES, VmSpec

AGENT_VSOCK_PORT = 1024
# qboot (Debian's qemu-system-data): a firmware that only loads the kernel, for a
# faster start than SeaBIOS under TCG (measured with bench/boot). Used under TCG
# only: KVM hosts keep QEMU's default firmware until measured and tested there.
QBOOT = Path("/usr/share/qemu/qboot.rom")
VHOST_VSOCK = Path("/dev/vhost-vsock")
# Ports of the virtio-serial controller, by name (the guest finds them in
# /sys/class/virtio-ports/*/name).
SERIAL_AGENT = "spinbox.agent"
SERIAL_CONTROL = "spinbox.control"
SERIAL_LOG = "spinbox.log"
# TCG's translation block cache, in MiB. QEMU's default (1 GiB on 64-bit hosts)
# grows with the guest's use and would take QEMU past the scope's MemoryMax
# overhead (config vm.memory_overhead_mib); QEMU flushes a full cache and
# translates again. Measured (QEMU 7.2, 256 MiB guest, at agent-ready): the
# cache holds ~72 MiB and QEMU's other memory ~89 MiB; 64 MiB made the boot
# flush and take longer, 128 MiB is never reached by a boot and keeps QEMU
# within 89 + 128 = 217 MiB of the 256 MiB overhead. 0: QEMU's default.
TCG_TB_SIZE_MIB = 128
# A VM restored from a template starts with an empty cache but never boots, and the
# cache's pages stay QEMU's once written (a full cache is flushed and refilled, not
# given back): its size is what an idle restored VM keeps. Measured (QEMU 7.2, 512 MiB
# guest, `info jit`): a restore and a `ctr run --rm IMAGE true` translate about 49 MiB
# (88,000 blocks: 60% guest kernel, 25% the Python interpreter, the rest libraries and
# crun); with 32 MiB the cache is flushed twice during the run, which took 2.8 s against
# 2.3 s with 48 MiB (one alternated run, medians of 4), but every idle VM keeps 20 MiB
# less. 16 MiB thrashed.
# spinbox.toml's vm.restored_tcg_cache_mib (the same default) sets it.
TCG_TB_SIZE_RESTORED_MIB = 32
# The id of guest RAM's memory backend, and the virtio-fs tag the guest mounts.
MEMORY_BACKEND = "mem"
VIRTIOFS_TAG = "spinbox"
# The virtio-mem device that memory is plugged into and unplugged from while the VM runs,
# and its backend. Its size is a whole number of the guest's memory blocks (128 MiB on
# x86_64 Linux): the guest uses no partial block of a device's region.
VIRTIO_MEM = "vmem0"
VIRTIO_MEM_BACKEND = "vmem"
GUEST_MEMORY_BLOCK_MIB = 128

TEMPLATE_VM_NAME = "template"

BASE_KERNEL_ARGS = (
    "console=ttyS0",
    "quiet",
    "panic=-1",  # reboot at once on panic; -no-reboot turns that into QEMU's exit
    "reboot=acpi",
    "8250.nr_uarts=1",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    # Memory a virtio-mem device plugs is onlined by the guest kernel itself (there is no
    # udev), into ZONE_MOVABLE so that the kernel can empty it again for an unplug.
    "memhp_default_state=online_movable",
    # Room to grow puts guest-physical memory above 4 GiB, and the kernel then sets aside a 64 MiB
    # bounce buffer (SWIOTLB) for devices that cannot reach it: a third of a small VM's memory
    # (its initramfs no longer fitted in 192 MiB). Virtio devices do not bounce; 1 MiB stays.
    "swiotlb=512",
    # Boot time, measured with bench/boot under TCG where it matters most:
    "cryptomgr.notests",  # the crypto self-tests alone took ~0.4 s of the kernel's boot
    "noreplace-smp",  # a 1-vCPU guest would otherwise rewrite every lock prefix of the kernel
    "no_timer_check",  # the IO-APIC timer check: QEMU's timer works
    "tsc=reliable",  # no clocksource watchdog: the virtual TSC does not drift against the others
)
# Under TCG the guest's TSC runs at the host's rate, but the kernel measures that rate
# against the emulated PIT, which on a busy host is far off (measured: 190 MHz for a
# 2445 MHz TSC, a guest clock running 13 times too fast, so that every timeout inside
# expired early). QEMU's HPET counts real time.
#
# Free page reporting of every free page, not only of free 2 MiB blocks (the kernel's
# default, which keeps the host's huge pages whole under KVM): under TCG that matters
# little, and a guest's freed memory is mostly in smaller pieces (vminitd applies it).
#
# TCG finds translated code by its virtual address: the programs vminitd runs (crun) load
# at fixed addresses so that each run reuses the code the last one translated, while
# containers' programs keep a randomized layout (guest/vminitd/boot.py, fix_tool_layout).
TCG_KERNEL_ARGS = ("clocksource=hpet", "spinbox.page_reporting_order=0", "spinbox.tool_layout=fixed")


@dataclass(frozen=True)
class RuntimePaths:
    """The files a running VM keeps in its runtime directory."""

    root: Path

    @property
    def qmp(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def console(self) -> Path:
        return self.root / "console.sock"

    @property
    def agent(self) -> Path:
        return self.root / "agent.sock"

    @property
    def control(self) -> Path:
        return self.root / "control.sock"

    @property
    def log(self) -> Path:
        return self.root / "log.sock"

    @property
    def state(self) -> Path:
        return self.root / "vm.json"

    def sockets(self) -> tuple[Path, ...]:
        return (self.qmp, self.console, self.agent, self.control, self.log)


# The fd set of the disk in the index-th hot-plug port is HOTPLUG_FDSET_BASE + index.
HOTPLUG_FDSET_BASE = 1000


def hotplug_port(index: int) -> str:
    """The id of the index-th spare PCIe root port."""
    return f"hp{index}"


# A template's devices in its slots (spinbox.vm.template): an empty disk reads zeros (SLOT_DISK_BYTES);
# a NIC has this MAC and, as its peer, a TAP alone in a network namespace of its own.
SLOT_MAC = "02:53:42:00:00:00"


def slot_serial(index: int) -> str:
    """The serial of the index-th empty disk slot: never a disk's (those have no '~')."""
    return f"~slot{index}"


@dataclass(frozen=True)
class PortLayout:
    """Which spare port holds each of a VM's disks and NICs (by index in the spec)."""

    disks: tuple[int, ...]
    nics: tuple[int, ...]


def port_layout(spec: VmSpec) -> PortLayout:
    """Disks in the disk slots, NICs in the NIC slots; the others in the ports after the slots,
    disks first (no slots: every disk, then every NIC, from the first port)."""
    disk_slots, nic_slots = spec.disk_slots, spec.nic_slots
    disks = tuple(i if i < disk_slots else nic_slots + i for i in range(len(spec.disks)))
    further_disks = max(0, len(spec.disks) - disk_slots)
    nics = tuple(
        disk_slots + j if j < nic_slots else disk_slots + nic_slots + further_disks + j - nic_slots
        for j in range(len(spec.nics))
    )
    return PortLayout(disks, nics)


def _escape(value: str | Path) -> str:
    """QEMU option values double their commas."""
    return str(value).replace(",", ",,")


def memory_backend_args(spec: VmSpec) -> tuple[str, list[str]]:
    """The -machine suboption and the options that give the guest its RAM ("" and [] for QEMU's own).

    A template's RAM is a file; a VM with a virtio-fs share has its RAM in a memfd shared with
    virtiofsd (vhost-user maps guest memory), which is why such a VM never starts from a template.
    """
    memory = spec.memory_file
    size = f"id={MEMORY_BACKEND},size={spec.memory_mib}M"
    if memory is not None:
        share = "on" if memory.shared else "off"
        path = memory.path if memory.fd is None else Path(f"/proc/self/fd/{memory.fd}")
        backend = f"memory-backend-file,{size},mem-path={_escape(path)},share={share}"
    elif spec.virtiofs_fd is not None:
        backend = f"memory-backend-memfd,{size},share=on"
    else:
        return "", []
    return f",memory-backend={MEMORY_BACKEND}", ["-object", backend]


def hotplug_memory_mib(spec: VmSpec) -> int:
    """The size of the VM's virtio-mem region: what a resize may add to its boot memory."""
    room = max(0, spec.max_memory_mib - spec.memory_mib)
    return room - room % GUEST_MEMORY_BLOCK_MIB


def size_args(spec: VmSpec) -> list[str]:
    """-smp and -m, and the virtio-mem device of a resizable VM."""
    smp = str(spec.vcpus)
    if spec.max_vcpus > spec.vcpus:
        smp += f",maxcpus={spec.max_vcpus}"
    room = hotplug_memory_mib(spec)
    if not room:
        return ["-smp", smp, "-m", f"{spec.memory_mib}M"]
    # virtiofsd maps all of guest RAM: plugged memory too must be shared with it. reserve=off:
    # the unplugged region takes no commit charge on the host.
    kind = "memory-backend-ram" if spec.virtiofs_fd is None else "memory-backend-memfd,share=on"
    return [
        "-smp", smp,
        "-m", f"{spec.memory_mib}M,maxmem={spec.memory_mib + room}M",
        "-object", f"{kind},id={VIRTIO_MEM_BACKEND},size={room}M,reserve=off",
        "-device", f"virtio-mem-pci,id={VIRTIO_MEM},memdev={VIRTIO_MEM_BACKEND},requested-size=0",
    ]  # fmt: skip


def _unix_server(chardev_id: str, path: Path, files: Handover, mux: bool = False) -> list[str]:
    fd = files.listening_socket(path)
    return ["-chardev", f"socket,id={chardev_id},fd={fd},server=on,wait=off" + (",mux=on" if mux else "")]


class QemuCommand:
    """Builds QEMU's argv for a spec; `vsock_cid` selects vsock over virtio-serial for the agent.

    `user` confines QEMU (its own uid, -sandbox); None runs it as the caller, unconfined.
    Whatever QEMU needs is opened into the Handover given to argv() (see spinbox.vm.handover).
    """

    def __init__(
        self,
        spec: VmSpec,
        *,
        accel: str | None = None,
        vsock_cid: int | None = None,
        keep_fds: tuple[int, ...] = (),
        start_paused: bool = True,
        user: VmUser | None = None,
    ) -> None:
        self.spec = spec
        self.accel = accel or choose_accel(spec.accel)
        self.vsock_cid = vsock_cid
        self.keep_fds = keep_fds
        self.start_paused = start_paused
        self.user = user
        self.paths = RuntimePaths(spec.runtime_dir)

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """File descriptors QEMU inherits: TAPs, a migration stream, RAM, virtiofsd's connection, and
        what the caller keeps alive with it."""
        spec = self.spec
        incoming = () if spec.incoming_fd is None else (spec.incoming_fd,)
        memory = () if spec.memory_file is None or spec.memory_file.fd is None else (spec.memory_file.fd,)
        lease = (self.user.lease_fd,) if self.user is not None and self.user.lease_fd >= 0 else ()
        share = () if spec.virtiofs_fd is None else (spec.virtiofs_fd,)
        return tuple(nic.tap_fd for nic in spec.nics) + incoming + memory + share + self.keep_fds + lease

    @property
    def agent_address(self) -> str:
        if self.vsock_cid is not None:
            return f"vsock:{self.vsock_cid}:{AGENT_VSOCK_PORT}"
        return f"unix:{self.paths.agent}"

    @property
    def control_address(self) -> str:
        if self.vsock_cid is not None:
            return f"vsock:{self.vsock_cid}:{AGENT_VSOCK_PORT}"
        return f"unix:{self.paths.control}"

    def kernel_cmdline(self) -> str:
        agent = "serial" if self.vsock_cid is None else f"vsock:{AGENT_VSOCK_PORT}"
        # A template and the VMs restored from it share one command line: it is the template's boot.
        vm_id = TEMPLATE_VM_NAME if self.spec.memory_file is not None else self.spec.vm_id
        args = [*BASE_KERNEL_ARGS, f"spinbox.vm={vm_id}", f"spinbox.agent={agent}"]
        if self.accel == "tcg":
            args += TCG_KERNEL_ARGS
        return " ".join([*args, *self.spec.kernel_args])

    def _accel_option(self) -> str:
        size = self.spec.tcg_cache_mib or (
            TCG_TB_SIZE_MIB if self.spec.incoming_fd is None else TCG_TB_SIZE_RESTORED_MIB
        )
        if self.accel == "tcg" and size:
            return f"tcg,tb-size={size}"
        return self.accel

    def argv(self, files: Handover) -> list[str]:
        """QEMU's argv, opening what it needs into `files` (pass files.fds to the spawn too)."""
        spec = self.spec
        paths = self.paths
        memory_option, memory_args = memory_backend_args(spec)
        machine = "q35,sata=off,smbus=off,usb=off,vmport=off,i8042=off,graphics=off" + memory_option
        cpu = "host" if self.accel == "kvm" else "max,la57=off"
        argv = [
            spec.qemu,
            "-name", f"{_escape(spec.vm_id)},process=spinbox-vm-{spec.vm_id}",
            "-machine", machine,
            "-accel", self._accel_option(),
            "-cpu", cpu,
            *size_args(spec),
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-no-reboot",
            "-kernel", files.world_readable(spec.kernel, "the guest kernel"),
            "-initrd", files.world_readable(spec.initrd, "the guest image"),
            "-append", self.kernel_cmdline(),
            *_unix_server("qmp", paths.qmp, files),
            "-mon", "chardev=qmp,mode=control",
            # A mux, for its escape Ctrl-a b: a BREAK on the serial port, the guest's magic SysRq
            # (spinbox.vm.gueststate). Nothing else is written to the console.
            *_unix_server("console", paths.console, files, mux=True),
            "-serial", "chardev:console",
            "-device", "virtio-rng-pci,id=rng0",
            # Pages the guest frees go back to the host (free page reporting, no ballooning).
            "-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
            # A guest kernel panic becomes QMP's GUEST_PANICKED and QEMU's exit with status 1.
            "-device", "pvpanic-pci,id=panic0",
            "-action", "panic=exit-failure",
            *memory_args,
        ]  # fmt: skip
        if spec.incoming_fd is not None:
            argv += ["-incoming", "defer"]
        if self.user is not None:
            argv += ["-sandbox", SANDBOX]
        if self.accel == "tcg" and QBOOT.is_file():
            argv += ["-bios", str(QBOOT)]
        if self.start_paused:
            argv.append("-S")
        for index in range(spec.hotplug_ports):
            # Root ports of 8 per slot (functions of one multifunction slot) keep
            # bus 0's slots free; no I/O window: modern virtio devices need none.
            slot, function = 0x10 + index // 8, index % 8
            multifunction = ",multifunction=on" if function == 0 else ""
            argv += [
                "-device",
                f"pcie-root-port,id={hotplug_port(index)},bus=pcie.0,chassis={index + 1},"
                f"addr={slot:#x}.{function}{multifunction},io-reserve=0",
            ]  # fmt: skip
        layout = port_layout(spec)
        in_ports = spec.incoming_fd is not None or spec.disk_slots or spec.nic_slots
        for index, disk in enumerate(spec.disks):
            port = layout.disks[index]
            node = f"{hotplug_port(port)}-drive" if in_ports else f"disk{index}"
            # A restored VM's disks sit in hot-plug ports: their fd sets are those ports' (so that
            # VirtualMachine.remove_disk finds them).
            set_id = HOTPLUG_FDSET_BASE + port if in_ports else None
            add_fd, filename = files.fdset(disk.path, writable=not disk.read_only, set_id=set_id)
            blockdev = {
                "driver": "raw",
                "node-name": node,
                "read-only": disk.read_only,
                "file": {"driver": "file", "filename": filename, "read-only": disk.read_only},
            }
            argv += [*add_fd, "-blockdev", json.dumps(blockdev, separators=(",", ":"))]
            if not in_ports:
                argv += ["-device", f"virtio-blk-pci,id=blk{index},drive={node},serial={disk.serial}"]
        for index in range(len(spec.disks), spec.disk_slots):
            empty = {
                "driver": "null-co",
                "node-name": f"{hotplug_port(index)}-drive",
                "size": SLOT_DISK_BYTES,
                "read-zeroes": True,
            }
            argv += ["-blockdev", json.dumps(empty, separators=(",", ":"))]
        for index in range(spec.disk_slots):
            bus = hotplug_port(index)
            serial = spec.disks[index].serial if index < len(spec.disks) else slot_serial(index)
            argv += ["-device", f"virtio-blk-pci,id={bus}-blk,drive={bus}-drive,serial={serial},bus={bus}"]
        for index, nic in enumerate(spec.nics):
            argv += ["-netdev", f"tap,id=net{index},fd={nic.tap_fd}"]
            if not in_ports:
                argv += ["-device", f"virtio-net-pci,id=nic{index},netdev=net{index},mac={nic.mac}"]
        for index in range(spec.nic_slots):  # VmSpec.validate: every NIC slot has a NIC
            bus = hotplug_port(spec.disk_slots + index)
            argv += [
                "-device",
                f"virtio-net-pci,id=nic{index},netdev=net{index},mac={spec.nics[index].mac},bus={bus}",
            ]
        if spec.virtiofs_fd is not None:
            argv += [
                "-chardev", f"socket,id=virtiofs,fd={spec.virtiofs_fd}",
                "-device", f"vhost-user-fs-pci,id=fs0,chardev=virtiofs,tag={VIRTIOFS_TAG}",
            ]  # fmt: skip
        if self.vsock_cid is not None:
            vhost = files.file(VHOST_VSOCK, writable=True)
            argv += ["-device", f"vhost-vsock-pci,id=vsock0,guest-cid={self.vsock_cid},vhostfd={vhost}"]
        argv += ["-device", "virtio-serial-pci,id=vser0"]
        ports = [(SERIAL_LOG, "log", paths.log)]
        if self.vsock_cid is None:
            ports = [(SERIAL_AGENT, "agent", paths.agent), (SERIAL_CONTROL, "control", paths.control), *ports]
        for name, chardev, path in ports:
            argv += [
                *_unix_server(chardev, path, files),
                "-device", f"virtserialport,bus=vser0.0,chardev={chardev},name={name}",
            ]  # fmt: skip
        argv += spec.extra_args
        return self.user.setpriv(argv) if self.user is not None else argv
