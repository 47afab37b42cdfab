"""A hot-plugged disk can answer ENXIO for a moment after it shows in sysfs:
the rootfs mount waits that out, and fails at once on any other error."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest

from guest.vminitd import rootfs, syscalls
from spinbox.api.proto import agent_pb2 as pb
from spinbox.daemon.qemu import DEVICE_WAIT_SHARE, with_device_wait
from spinbox.ttrpc import TtrpcError


def test_enxio_is_waited_out(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [OSError(errno.ENXIO, "No such device or address")] * 3
    calls: list[str] = []

    def mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
        calls.append(source)
        if answers:
            raise answers.pop()

    monkeypatch.setattr(syscalls, "mount", mount)
    rootfs.mount_when_ready(Path("/dev/vde"), Path("/mnt"), "erofs", 0, wait=5)
    assert calls == ["/dev/vde"] * 4


def test_other_errors_and_a_lasting_enxio_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    def bad_fs(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(syscalls, "mount", bad_fs)
    with pytest.raises(OSError) as info:
        rootfs.mount_when_ready(Path("/dev/vde"), Path("/mnt"), "erofs", 0, wait=5)
    assert info.value.errno == errno.EINVAL

    def gone(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
        raise OSError(errno.ENXIO, "No such device or address")

    monkeypatch.setattr(syscalls, "mount", gone)
    with pytest.raises(OSError) as info:
        rootfs.mount_when_ready(Path("/dev/vde"), Path("/mnt"), "erofs", 0, wait=0.1)
    assert info.value.errno == errno.ENXIO


def test_the_wait_for_a_hot_plugged_disk_is_the_one_the_host_sends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The host derives the wait from timeouts.agent_call; the guest keeps to it, not to a constant.
    agent_call = 0.5
    request = with_device_wait(
        pb.MountRootfsRequest(container_id="c1", lowers=[pb.BlockDevice(serial="sb-l0", fstype="erofs")]),
        agent_call / DEVICE_WAIT_SHARE,
    )
    assert request.device_wait_ms == 1000  # never below a second
    request.device_wait_ms = 300
    assert rootfs.device_wait(request) == pytest.approx(0.3)
    assert rootfs.device_wait(pb.MountRootfsRequest()) == rootfs.DEVICE_WAIT
    sys_block = tmp_path / "sys"
    sys_block.mkdir()
    manager = rootfs.RootfsManager(tmp_path / "rootfs", tmp_path / "mnt", sys_block, tmp_path / "dev")
    started = time.monotonic()
    with pytest.raises(TtrpcError, match=r"no block device has the serial 'sb-l0' after waiting 0.3 s"):
        manager.mount(request)
    assert 0.3 <= time.monotonic() - started < 5
    assert not (tmp_path / "mnt" / "c1").exists()

    # A disk that shows up within the wait is mounted.
    mounted: list[str] = []
    monkeypatch.setattr(syscalls, "mount", lambda source, target, *args: mounted.append(source))
    request.device_wait_ms = 30_000

    def plug() -> None:
        (sys_block / "vdc").mkdir()
        (sys_block / "vdc" / "serial").write_text("sb-l0")

    late = threading.Timer(0.5, plug)
    late.start()
    try:
        manager.mount(request)
    finally:
        late.cancel()
    assert mounted[0] == str(tmp_path / "dev" / "vdc")


def test_the_host_gives_the_guest_most_of_its_agent_call_deadline() -> None:
    request = with_device_wait(pb.MountRootfsRequest(container_id="c1"), 60)
    assert request.device_wait_ms == 48_000
    assert request.container_id == "c1"


def test_a_failed_sync_at_unmount_still_unmounts_and_reaches_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys_block = tmp_path / "sys"
    (sys_block / "vda").mkdir(parents=True)
    (sys_block / "vda" / "serial").write_text("sb-l0")
    mounts: list[str] = []
    monkeypatch.setattr(syscalls, "mount", lambda source, target, *args: mounts.append(target))

    def umount(target: str, flags: int = 0) -> None:
        # A bind mount remounted read-only is two entries on one target, gone with one umount.
        while target in mounts:
            mounts.remove(target)

    monkeypatch.setattr(syscalls, "umount", umount)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(syscalls, "syncfs", eio)
    manager = rootfs.RootfsManager(tmp_path / "rootfs", tmp_path / "mnt", sys_block, tmp_path / "dev")
    request = pb.MountRootfsRequest(
        container_id="c1", lowers=[pb.BlockDevice(serial="sb-l0", fstype="erofs")]
    )
    manager.mount(request)
    assert mounts
    with pytest.raises(
        TtrpcError, match=r"syncing the rootfs of container c1 \(.*\) failed: Input/output error"
    ):
        manager.unmount("c1")
    assert mounts == [] and "c1" not in manager.mounted


def test_a_writable_layer_is_mounted_without_background_inode_table_zeroing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, str]] = []

    def mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
        calls.append((fstype, data))

    monkeypatch.setattr(syscalls, "mount", mount)
    rootfs.mount_when_ready(Path("/dev/vdb"), Path("/mnt/upper"), "ext4", 0, wait=0)
    rootfs.mount_when_ready(Path("/dev/vda"), Path("/mnt/lower0"), "erofs", syscalls.MS_RDONLY, wait=0)
    assert calls == [("ext4", "noinit_itable"), ("erofs", "")]
