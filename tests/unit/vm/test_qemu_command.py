"""The QEMU command line spinbox builds for a VM."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
from pathlib import Path

import pytest

from spinbox.config import VmConfig
from spinbox.vm import Disk, Nic, QemuCommand, VmError, VmSpec, qemu
from spinbox.vm.handover import SANDBOX, Handover, VmUser
from tests.unit.vm.conftest import BootFiles


@pytest.fixture
def spec(boot_files: BootFiles) -> VmSpec:
    return VmSpec(
        vm_id="vm1", kernel=boot_files.kernel, initrd=boot_files.initrd, runtime_dir=boot_files.runtime_dir
    )


def argv_of(command: QemuCommand) -> list[str]:
    with Handover() as files:
        return command.argv(files)


def fd_path(value: str) -> str:
    """The file a /proc/self/fd/N path named while the handover was open is not checked here."""
    return value.rsplit("/", 1)[0]


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def test_basic_machine(spec: VmSpec) -> None:
    argv = argv_of(QemuCommand(spec, accel="tcg"))
    assert argv[0] == "qemu-system-x86_64"
    assert "-sandbox" not in argv
    assert option_values(argv, "-machine")[0].startswith("q35,")
    assert option_values(argv, "-accel") == ["tcg,tb-size=128"]
    assert option_values(argv, "-m") == ["256M"]
    assert option_values(argv, "-smp") == ["1"]
    assert [fd_path(v) for v in option_values(argv, "-kernel")] == ["/proc/self/fd"]
    assert [fd_path(v) for v in option_values(argv, "-initrd")] == ["/proc/self/fd"]
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot", "-S"):
        assert flag in argv
    assert "virtio-rng-pci,id=rng0" in option_values(argv, "-device")
    assert "pvpanic-pci,id=panic0" in option_values(argv, "-device")
    assert option_values(argv, "-action") == ["panic=exit-failure"]
    assert option_values(argv, "-serial") == ["chardev:console"]
    assert option_values(argv, "-mon") == ["chardev=qmp,mode=control"]


def test_tcg_translation_cache_fits_in_the_memory_overhead(
    spec: VmSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    # QEMU's own memory besides guest RAM and this cache, measured at agent-ready under TCG.
    measured_qemu_mib = 89
    assert qemu.TCG_TB_SIZE_MIB + measured_qemu_mib <= VmConfig().memory_overhead_mib
    monkeypatch.setattr(qemu, "TCG_TB_SIZE_MIB", 0)
    assert option_values(argv_of(QemuCommand(spec, accel="tcg")), "-accel") == ["tcg"]


def test_kvm_uses_the_host_cpu(spec: VmSpec) -> None:
    argv = argv_of(QemuCommand(spec, accel="kvm"))
    assert option_values(argv, "-accel") == ["kvm"]
    assert option_values(argv, "-cpu") == ["host"]


def test_kernel_command_line(spec: VmSpec) -> None:
    spec = VmSpec(**{**spec.__dict__, "kernel_args": ("loglevel=7",)})
    cmdline = QemuCommand(spec, accel="tcg").kernel_cmdline().split()
    assert "console=ttyS0" in cmdline
    assert "spinbox.vm=vm1" in cmdline
    assert "spinbox.agent=serial" in cmdline
    assert cmdline[-1] == "loglevel=7"  # the caller's arguments come last and win
    # TCG's TSC rate, calibrated against the emulated PIT, is unreliable on a busy host.
    assert "clocksource=hpet" in cmdline
    assert "spinbox.page_reporting_order=0" in cmdline
    # TCG reuses crun's translated code only where crun loads at the same addresses.
    assert "spinbox.tool_layout=fixed" in cmdline
    kvm = QemuCommand(spec, accel="kvm").kernel_cmdline().split()
    assert "clocksource=hpet" not in kvm and "spinbox.tool_layout=fixed" not in kvm


def test_serial_ports_without_vsock(spec: VmSpec) -> None:
    command = QemuCommand(spec, accel="tcg")
    argv = argv_of(command)
    devices = option_values(argv, "-device")
    chardevs = option_values(argv, "-chardev")
    for name, chardev in (("spinbox.agent", "agent"), ("spinbox.control", "control"), ("spinbox.log", "log")):
        assert f"virtserialport,bus=vser0.0,chardev={chardev},name={name}" in devices
        # spinboxd listens at the path (root's, mode 0600); QEMU gets the socket.
        path = spec.runtime_dir / f"{chardev}.sock"
        assert path.is_socket() and path.stat().st_mode & 0o777 == 0o600
        assert any(re.fullmatch(rf"socket,id={chardev},fd=\d+,server=on,wait=off", c) for c in chardevs)
    # The console is a mux: its escape Ctrl-a b is a BREAK, the guest's magic SysRq.
    assert any(re.fullmatch(r"socket,id=console,fd=\d+,server=on,wait=off,mux=on", c) for c in chardevs)
    assert option_values(argv, "-serial") == ["chardev:console"]
    assert not any(d.startswith("vhost-vsock") for d in devices)
    assert command.agent_address == f"unix:{spec.runtime_dir}/agent.sock"
    assert command.control_address == f"unix:{spec.runtime_dir}/control.sock"


def test_vsock_replaces_agent_ports(spec: VmSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    command = QemuCommand(spec, accel="tcg", vsock_cid=42, keep_fds=(9,))
    monkeypatch.setattr(qemu, "VHOST_VSOCK", Path("/dev/null"))  # opened by spinboxd, handed over
    argv = argv_of(command)
    devices = option_values(argv, "-device")
    assert any(re.fullmatch(r"vhost-vsock-pci,id=vsock0,guest-cid=42,vhostfd=\d+", d) for d in devices)
    assert not any("name=spinbox.agent" in d or "name=spinbox.control" in d for d in devices)
    assert any("name=spinbox.log" in d for d in devices)  # logs stay on virtio-serial
    assert command.agent_address == command.control_address == "vsock:42:1024"
    assert "spinbox.agent=vsock:1024" in command.kernel_cmdline().split()
    assert command.pass_fds == (9,)


def test_disks_and_nics(spec: VmSpec, tmp_path: Path) -> None:
    layer = tmp_path / "layer,1.erofs"
    layer.write_bytes(b"")
    upper = tmp_path / "upper.ext4"
    upper.write_bytes(b"")
    spec = VmSpec(
        **{
            **spec.__dict__,
            "disks": (Disk(layer, "layer1", read_only=True), Disk(upper, "upper", read_only=False)),
            "nics": (Nic(tap_fd=17, mac="52:54:00:12:34:56"),),
        }
    )
    spec.validate()
    command = QemuCommand(spec, accel="tcg")
    with Handover() as files:
        argv = command.argv(files)
        # Each image is an fd set of one descriptor spinboxd opened, read-only unless writable.
        add_fds = option_values(argv, "-add-fd")
        fds = [int(re.fullmatch(r"fd=(\d+),set=\d+", a)[1]) for a in add_fds]  # type: ignore[index]
        assert [
            os.path.samefile(f"/proc/self/fd/{fd}", image)
            for fd, image in zip(fds, (layer, upper), strict=True)
        ] == [True] * 2
        assert [os.O_ACCMODE & fcntl.fcntl(fd, fcntl.F_GETFL) for fd in fds] == [os.O_RDONLY, os.O_RDWR]
    blockdevs = [json.loads(b) for b in option_values(argv, "-blockdev")]
    sets = [a.split("set=")[1] for a in add_fds]
    assert [b["file"]["filename"] for b in blockdevs] == [f"/dev/fdset/{s}" for s in sets]
    assert [b["read-only"] for b in blockdevs] == [True, False]
    devices = option_values(argv, "-device")
    assert "virtio-blk-pci,id=blk0,drive=disk0,serial=layer1" in devices
    assert "virtio-blk-pci,id=blk1,drive=disk1,serial=upper" in devices
    assert option_values(argv, "-netdev") == ["tap,id=net0,fd=17"]
    assert "virtio-net-pci,id=nic0,netdev=net0,mac=52:54:00:12:34:56" in devices
    assert command.pass_fds == (17,)


def test_commas_in_names_are_escaped(spec: VmSpec) -> None:
    spec = VmSpec(**{**spec.__dict__, "vm_id": "a,b"})
    assert option_values(argv_of(QemuCommand(spec, accel="tcg")), "-name")[0].startswith("a,,b,")


def test_a_confined_qemu_runs_as_its_user_under_the_sandbox(spec: VmSpec) -> None:
    user = VmUser(uid=2097152005, gid=2097152005, groups=(107,), lease_fd=-1)
    argv = argv_of(QemuCommand(spec, accel="kvm", user=user))
    start = len(argv) - argv[::-1].index("--")
    assert argv[: start + 1] == [
        "unshare", "--net", "--ipc", "--",
        "setpriv",
        "--reuid", "2097152005",
        "--regid", "2097152005",
        "--groups", "107",
        "--inh-caps", "-all",
        "--bounding-set", "-all",
        "--no-new-privs",
        "--",
        "qemu-system-x86_64",
    ]  # fmt: skip
    assert option_values(argv, "-sandbox") == [SANDBOX]
    assert SANDBOX == "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def test_a_kernel_only_root_can_read_is_refused(spec: VmSpec) -> None:
    spec.kernel.chmod(0o600)
    with pytest.raises(VmError, match=r"not readable by the VMs' users: .*chmod o\+r"):
        argv_of(QemuCommand(spec, accel="tcg"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vm_id": "bad id"}, "VM id 'bad id' is not valid"),
        ({"vcpus": 0}, "vcpus must be between 1 and 255"),
        ({"memory_mib": 8}, "memory_mib must be at least 64 MiB"),
        ({"accel": "hvf"}, "accel must be"),
        ({"kernel": Path("/nonexistent/vmlinuz")}, "apt install linux-image-cloud-amd64"),
        ({"initrd": Path("/nonexistent/initrd.img")}, "spinbox-mkguest --output /nonexistent/initrd.img"),
        ({"runtime_dir": Path("/run/" + "x" * 100)}, "too long for unix socket paths"),
        ({"disks": (Disk(Path("/nonexistent.img"), "d1"),)}, "disk image /nonexistent.img does not exist"),
        ({"disks": (Disk(Path("/dev/null"), "a serial that is far too long"),)}, "disk serial"),
        ({"nics": (Nic(3, "52:54:00:AA:BB:CC"),)}, "is not of the form"),
        ({"kernel_args": ("two words",)}, "contains white space"),
    ],
)
def test_bad_specs_are_refused(spec: VmSpec, change: dict[str, object], message: str) -> None:
    with pytest.raises(VmError, match=message.replace("(", r"\(").replace(".", r"\.")):
        VmSpec(**{**spec.__dict__, **change}).validate()  # type: ignore[arg-type]


def test_a_share_adds_virtio_fs_and_a_shared_memory_backend(spec: VmSpec) -> None:
    plain = argv_of(QemuCommand(spec, accel="tcg"))
    assert "memory-backend" not in " ".join(plain) and "vhost-user-fs-pci" not in " ".join(plain)
    shared = dataclasses.replace(spec, memory_mib=512, virtiofs_fd=7)
    command = QemuCommand(shared, accel="tcg")
    argv = argv_of(command)
    assert option_values(argv, "-machine")[0].endswith(",memory-backend=mem")
    assert option_values(argv, "-object") == ["memory-backend-memfd,id=mem,size=512M,share=on"]
    assert "socket,id=virtiofs,fd=7" in option_values(argv, "-chardev")
    assert "vhost-user-fs-pci,id=fs0,chardev=virtiofs,tag=spinbox" in option_values(argv, "-device")
    assert 7 in command.pass_fds
