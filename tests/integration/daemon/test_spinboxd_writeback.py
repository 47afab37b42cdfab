"""Writeback with a real guest: the writable layer comes back as a stream spinboxd checks, never as
an image the host mounts; a refused layer leaves the snapshot as it was; the synced writes of a VM
whose QEMU was killed are read by a helper VM."""

from __future__ import annotations

import asyncio
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.mounts import HostMountWatch
from tests.harness.systemd import PrivateSystemd
from tests.integration.daemon.spinboxd import (
    BUS,
    MANAGER_IFACE,
    MANAGER_PATH,
    VM_IFACE,
    busctl,
    get_property,
    installed,
    leftovers,
)
from tests.integration.daemon.test_spinboxd_vms import NOTHING, add_rootfs, create, run_in_guest, snapshot
from tests.integration.guest.oci import busybox_rootfs

BB = "/bin/busybox"


@pytest.fixture(scope="module")
def spinbox(systemd: PrivateSystemd, guest_image: Path) -> Iterator[PrivateSystemd]:
    with installed(systemd, config=f'[vm]\ninitrd = "{guest_image}"\n'):
        systemd.systemctl("start", "spinbox.service")
        yield systemd
        assert leftovers(systemd) == NOTHING


def sync(systemd: PrivateSystemd, path: str, check: bool = True) -> str:
    result = busctl(systemd, "--timeout=300", "call", BUS, path, VM_IFACE, "SyncRootfs", check=check)
    return result.stderr


def test_writeback_is_a_checked_stream_never_a_host_mount(spinbox: PrivateSystemd) -> None:
    root = "/var/lib/containerd/spinbox-test-wb"
    with snapshot(spinbox, "wb") as rootfs:
        lower = busybox_rootfs(spinbox.path(f"{root}/1/fs"))
        (lower / "etc/ref").write_text("reference\n")
        (lower / "etc/gone").write_text("deleted by the container\n")
        os.utime(lower / "etc/ref", ns=(1_000_000_000_123_456_789, 1_000_000_000_123_456_789))
        upper = spinbox.path(f"{root}/2/fs")
        agent = "unix:" + str(spinbox.path("/run/spinbox/vm/vm-wb/agent.sock"))

        def run(script: str) -> None:
            assert asyncio.run(run_in_guest(agent, "box", BB, "sh", "-c", script)) == 0

        with HostMountWatch(spinbox, "vm-wb") as watch:
            path = create(spinbox, "vm-wb", rootfs, ("container-id", "s", "box"))
            run(
                f"echo aaaa > /data && {BB} touch -r /etc/ref /data && {BB} mkdir /d && echo x > /d/f"
                f" && {BB} ln /d/f /d/g && {BB} rm /etc/gone"
                f" && {BB} mkdir -m 2755 /sgid && echo s > /suid && {BB} chmod 4755 /suid"
            )
            busctl(spinbox, "call", BUS, path, VM_IFACE, "Pause")
            busctl(spinbox, "call", BUS, path, VM_IFACE, "Resume")
            sync(spinbox, path)
            assert (upper / "data").read_text() == "aaaa\n"
            assert (upper / "d/f").stat().st_ino == (upper / "d/g").stat().st_ino
            # Set-user-ID and set-group-ID bits come back as the guest made them.
            assert stat.S_IMODE((upper / "sgid").stat().st_mode) == 0o2755
            assert stat.S_IMODE((upper / "suid").stat().st_mode) == 0o4755
            gone = (upper / "etc/gone").lstat()
            assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0

            # Edited in place, same size, same mtime (touch -r): written back all the same.
            run(f"echo bbbb > /data && {BB} touch -r /etc/ref /data")
            sync(spinbox, path)
            assert (upper / "data").read_text() == "bbbb\n"
            assert (upper / "data").stat().st_mtime_ns == 1_000_000_000_123_456_789

            # A sparse file beyond the cap (the writable layer's size) is refused by name.
            before = sorted(str(p.relative_to(upper)) for p in upper.rglob("*"))
            run(f"{BB} truncate -s 20G /big")
            error = sync(spinbox, path, check=False)
            assert "the writable layer of container box holds more than the cap" in error
            assert "/big" in error
            assert sorted(str(p.relative_to(upper)) for p in upper.rglob("*")) == before
            assert sorted(p.name for p in upper.parent.iterdir()) == ["fs", "work"]

            # Stop: the guest sends the layer one last time, without a SyncRootfs before.
            run(f"{BB} rm /big && echo final > /final")
            busctl(spinbox, "--timeout=300", "call", BUS, path, VM_IFACE, "Stop", "t", "30000")
        assert watch.polls > 100
        assert watch.seen_for("/vms/vm-wb/") == []
        assert (upper / "final").read_text() == "final\n"
        assert not (upper / "big").exists()
        # The daemon's journal is shared with the tests before this one: only this VM's lines count.
        journal = spinbox.journal("-u", "spinbox.service", "-o", "cat").splitlines()
        assert not [line for line in journal if re.search(r"\bVM vm-wb\b", line) and "helper VM" in line]


def test_the_synced_writes_of_a_killed_qemu_are_read_by_a_helper_vm(spinbox: PrivateSystemd) -> None:
    root = "/var/lib/containerd/spinbox-test-wbkill"
    with snapshot(spinbox, "wbkill") as rootfs:
        busybox_rootfs(spinbox.path(f"{root}/1/fs"))
        upper = spinbox.path(f"{root}/2/fs")
        agent = "unix:" + str(spinbox.path("/run/spinbox/vm/vm-wbkill/agent.sock"))
        with HostMountWatch(spinbox, "vm-wbkill") as watch:
            path = create(spinbox, "vm-wbkill", rootfs, ("container-id", "s", "box"))
            script = f"echo late > /late && {BB} sync"
            assert asyncio.run(run_in_guest(agent, "box", BB, "sh", "-c", script)) == 0
            pid = get_property(spinbox, path, VM_IFACE, "Pid")
            spinbox.run("kill", "-KILL", str(pid))
            spinbox.wait_for("the VM to be released", lambda: leftovers(spinbox) == NOTHING, timeout=400)
        assert watch.seen_for("/vms/vm-wbkill/") == []
        assert (upper / "late").read_text() == "late\n"
        journal = spinbox.journal("-u", "spinbox.service", "-o", "cat")
        assert "VM vm-wbkill ended before its guest sent the writable layer of container box" in journal
        assert "VM vm-wbkill: the writable layer of container box was written back by a helper VM" in journal


def test_a_restarted_spinboxd_serves_while_a_helper_vm_writes_back_what_its_predecessor_left(
    spinbox: PrivateSystemd,
) -> None:
    """The leftover's writeback boots a helper VM: spinboxd takes its bus name first, so a call
    that activates it is answered meanwhile (it used to wait past the bus's 25 s activation
    timeout), a VM of the same id is refused by name, and GetVM answers once it is cleaned up."""
    root = "/var/lib/containerd/spinbox-test-wbrec"
    with snapshot(spinbox, "wbrec") as rootfs:
        busybox_rootfs(spinbox.path(f"{root}/1/fs"))
        upper = spinbox.path(f"{root}/2/fs")
        agent = "unix:" + str(spinbox.path("/run/spinbox/vm/vm-wbrec/agent.sock"))
        path = create(spinbox, "vm-wbrec", rootfs, ("container-id", "s", "box"))
        script = f"echo left > /left && {BB} sync"
        assert asyncio.run(run_in_guest(agent, "box", BB, "sh", "-c", script)) == 0
        pid = get_property(spinbox, path, VM_IFACE, "Pid")
        # spinboxd stops (its VMs keep running), then the VM's QEMU dies while nobody watches.
        spinbox.systemctl("stop", "spinbox.service")
        spinbox.run("kill", "-KILL", str(pid))
        spinbox.wait_for("QEMU to end", lambda: not spinbox.path(f"/proc/{pid}").exists())
        # Bus activation starts spinboxd; its answer comes while the helper VM runs.
        refused = create(spinbox, "vm-wbrec", check=False)
        assert "VM 'vm-wbrec' was left by a previous spinboxd and is being cleaned up" in refused, refused
        named = get_property(spinbox, MANAGER_PATH, MANAGER_IFACE, "Leftovers")
        assert "VM vm-wbrec: left by a previous spinboxd; being cleaned up" in " ".join(named), named  # type: ignore[arg-type]
        # GetVM waits for the cleanup; then the VM is gone and its layer is in the snapshot.
        gone = busctl(
            spinbox, "--timeout=300", "call", BUS, MANAGER_PATH, MANAGER_IFACE, "GetVM", "s", "vm-wbrec",
            check=False,
        )  # fmt: skip
        assert "there is no VM 'vm-wbrec'" in gone.stderr, gone.stderr
        assert (upper / "left").read_text() == "left\n"
        assert leftovers(spinbox) == NOTHING
    journal = spinbox.journal("-u", "spinbox.service", "-o", "cat").splitlines()
    serving = max(i for i, line in enumerate(journal) if line.startswith("serving org.spinstack.Spinbox"))
    written = journal.index(
        "VM vm-wbrec: the writable layer of container box was written back by a helper VM"
    )
    assert serving < written


def test_a_pod_members_rootfs_removed_as_its_qemu_dies_is_answered_once_written_back(
    spinbox: PrivateSystemd,
) -> None:
    """RemoveRootfs right after the pod VM's QEMU was killed (as containerd's CRI sends it): the
    VM's release writes the member's layer back with a helper VM before its image goes, and the
    call answers with that outcome (it used to fail "VM is stopping", or drop the image)."""
    app_root = "/var/lib/containerd/spinbox-test-wbpod1"
    with snapshot(spinbox, "wbpod0") as pause, snapshot(spinbox, "wbpod1") as app:
        busybox_rootfs(spinbox.path(f"{app_root}/1/fs"))
        path = create(spinbox, "vm-wbpod", pause, ("container-id", "s", "pause"), ("hotplug-ports", "u", "2"))
        add_rootfs(spinbox, path, "app", app)
        agent = "unix:" + str(spinbox.path("/run/spinbox/vm/vm-wbpod/agent.sock"))
        script = f"echo member > /member && {BB} sync"
        assert asyncio.run(run_in_guest(agent, "app", BB, "sh", "-c", script)) == 0
        pid = get_property(spinbox, path, VM_IFACE, "Pid")
        spinbox.run("kill", "-KILL", str(pid))
        removal = busctl(
            spinbox, "--timeout=300", "call", BUS, path, VM_IFACE, "RemoveRootfs", "s", "app", check=False
        )
        assert removal.returncode == 0, removal.stderr
        assert spinbox.path(f"{app_root}/2/fs/member").read_text() == "member\n"
        spinbox.wait_for("the VM to be released", lambda: leftovers(spinbox) == NOTHING, timeout=400)
    assert not spinbox.path("/var/lib/spinbox/vms/vm-wbpod").exists()
    journal = spinbox.journal("-u", "spinbox.service", "-o", "cat").splitlines()
    lines = [line for line in journal if re.search(r"\bVM vm-wbpod\b", line)]
    assert "VM vm-wbpod: the writable layer of container app was written back by a helper VM" in lines, lines
    assert not [line for line in lines if "does not exist" in line or "not written back" in line], lines
