"""Container root filesystems from virtio-blk devices: EROFS lowers, an ext4 or tmpfs upper, overlayfs.

Layout for container <id>: each device at <mnt>/<id>/lower<N> or <mnt>/<id>/upper, the
merged rootfs at <rootfs_dir>/<id>. In the upper filesystem the overlay's upper and work
directories are `upper` and `work` (inside its subdir when one is given).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from guest.vminitd import syscalls, validate
from spinbox.api.proto import agent_pb2 as pb
from spinbox.ttrpc import Code, TtrpcError

log = logging.getLogger(__name__)

FSTYPES = ("erofs", "ext4")
# ioctl: write back and drop a block device's buffers.
BLKFLSBUF = 0x1261


# A disk hot-plugged just before MountRootfs (a pod's further containers)
# appears once the guest kernel has handled the hotplug event: on a loaded
# host that can take as long as the host's own deadline for the call. The host
# sends its wait in the request (derived from timeouts.agent_call); this is
# the wait of a request that names none.
DEVICE_WAIT = 10.0
# A request's wait is capped: the guest never blocks a call for longer.
DEVICE_WAIT_MAX = 3600.0


def device_wait(req: pb.MountRootfsRequest, default: float = DEVICE_WAIT) -> float:
    """Seconds to wait for the request's disks: the host's choice, else `default`."""
    if req.device_wait_ms:
        return min(req.device_wait_ms / 1000, DEVICE_WAIT_MAX)
    return default


def find_device(
    serial: str, sys_block: Path = Path("/sys/block"), dev: Path = Path("/dev"), wait: float = 0.0
) -> Path:
    """The block device whose virtio-blk serial is `serial`, waiting up to `wait` seconds for it."""
    deadline = time.monotonic() + wait
    while True:
        for entry in sorted(sys_block.glob("vd*")):
            with contextlib.suppress(OSError):
                if (entry / "serial").read_text().strip() == serial:
                    return dev / entry.name
        if time.monotonic() >= deadline:
            waited = f" after waiting {wait:g} s for the hot-plugged disk" if wait else ""
            raise TtrpcError(Code.NOT_FOUND, f"no block device has the serial {serial!r}{waited}")
        time.sleep(0.02)


# A writable layer's ext4 comes from mkfs.ext4 on the host with its inode tables left
# uninitialized (a new sparse file reads as zeros, and the group descriptors say which
# inodes are in use). Without noinit_itable the guest's kernel would zero every table in
# the background after the mount: 160 MiB of writes for a 10 GiB layer, and journal
# commits that the container's start and the layer's export then wait behind.
MOUNT_DATA = {"ext4": "noinit_itable"}


def drop_cached_blocks(device: Path) -> None:
    """Forget what the kernel cached of `device`'s blocks (BLKFLSBUF): a disk in one of a
    template's device slots was read (its partition table) while the template's placeholder
    backed it, and a mount must read the VM's own disk."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # not openable yet: a disk just hot-plugged, of which nothing is cached
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            fcntl.ioctl(fd, BLKFLSBUF)
    finally:
        os.close(fd)


def mount_when_ready(source: Path, point: Path, fstype: str, flags: int, wait: float) -> None:
    """mount(2) of a block device, retrying for up to `wait` seconds while it
    answers ENXIO: a hot-plugged disk shows in sysfs a moment before it opens."""
    deadline = time.monotonic() + wait
    while True:
        try:
            syscalls.mount(str(source), str(point), fstype, flags, MOUNT_DATA.get(fstype, ""))
            return
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() >= deadline:
                raise
        time.sleep(0.02)


@dataclass
class MountedRootfs:
    container_id: str
    path: Path
    mounts: list[Path] = field(default_factory=list)  # in mount order, the rootfs last
    upper: Path | None = None  # the writable filesystem's mount point (ext4 upper)
    upper_dir: Path | None = None  # the overlay's upper directory in it


class RootfsManager:
    def __init__(
        self,
        rootfs_dir: Path,
        mnt_dir: Path,
        sys_block: Path = Path("/sys/block"),
        dev: Path = Path("/dev"),
        device_wait: float = DEVICE_WAIT,
    ) -> None:
        self.rootfs_dir = rootfs_dir
        self.device_wait = device_wait
        self.mnt_dir = mnt_dir
        self.sys_block = sys_block
        self.dev = dev
        self.mounted: dict[str, MountedRootfs] = {}

    def check(self, req: pb.MountRootfsRequest) -> None:
        validate.container_id(req.container_id)
        if not req.lowers:
            raise validate.InvalidRequest("a rootfs needs at least one read-only layer")
        devices = [*req.lowers, *([req.upper] if req.HasField("upper") else [])]
        for device in devices:
            validate.serial(device.serial)
            validate.subdir(device.subdir)
            if device.fstype not in FSTYPES:
                raise validate.InvalidRequest(
                    f"filesystem type {device.fstype!r} is not one of {', '.join(FSTYPES)}"
                )
        if req.HasField("upper") and req.tmpfs_upper:
            raise validate.InvalidRequest("a rootfs has either an upper device or a tmpfs upper, not both")
        if req.HasField("upper") and req.upper.read_only:
            raise validate.InvalidRequest(f"the upper device {req.upper.serial!r} is read-only")
        serials = [d.serial for d in devices]
        if len(set(serials)) != len(serials):
            raise validate.InvalidRequest("a block device is named twice")

    def mount(self, req: pb.MountRootfsRequest) -> Path:
        """Mounts the rootfs (blocking: run it in a thread). Leaves nothing mounted on failure."""
        self.check(req)
        cid = req.container_id
        if cid in self.mounted:
            raise TtrpcError(Code.ALREADY_EXISTS, f"the rootfs of container {cid} is already mounted")
        work = self.mnt_dir / cid
        target = self.rootfs_dir / cid
        state = MountedRootfs(cid, target)
        wait = device_wait(req, self.device_wait)
        try:
            lowers = []
            for i, layer in enumerate(req.lowers):
                point = work / f"lower{i}"
                self._mount_device(layer, point, read_only=True, state=state, wait=wait)
                lowers.append(point / validate.subdir(layer.subdir))
            upper_dir = work_dir = None
            if req.HasField("upper") or req.tmpfs_upper:
                point = work / "upper"
                if req.HasField("upper"):
                    self._mount_device(req.upper, point, read_only=False, state=state, wait=wait)
                    state.upper = point
                    base = point / validate.subdir(req.upper.subdir)
                else:
                    point.mkdir(parents=True, exist_ok=True)
                    syscalls.mount("tmpfs", str(point), "tmpfs", 0, "mode=0755")
                    state.mounts.append(point)
                    base = point
                upper_dir, work_dir = base / "upper", base / "work"
                if state.upper is not None:
                    state.upper_dir = upper_dir
                upper_dir.mkdir(parents=True, exist_ok=True)
                if work_dir.exists():
                    shutil.rmtree(work_dir)  # stale overlay state from a previous mount
                work_dir.mkdir()
            target.mkdir(parents=True, exist_ok=True)
            if upper_dir is None and len(lowers) == 1:
                syscalls.mount(str(lowers[0]), str(target), "", syscalls.MS_BIND)
                state.mounts.append(target)
                syscalls.mount(
                    "", str(target), "", syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY
                )
            else:
                options = "lowerdir=" + ":".join(str(p) for p in lowers)
                if upper_dir is not None:
                    options += f",upperdir={upper_dir},workdir={work_dir}"
                syscalls.mount("overlay", str(target), "overlay", 0, options)
                state.mounts.append(target)
        except BaseException:
            self._release(state)
            raise
        self.mounted[cid] = state
        log.info("mounted the rootfs of container %s at %s", cid, target)
        return target

    def _mount_device(
        self, device: pb.BlockDevice, point: Path, read_only: bool, state: MountedRootfs, wait: float
    ) -> None:
        source = find_device(device.serial, self.sys_block, self.dev, wait)
        try:
            drop_cached_blocks(source)
        except OSError as e:
            raise TtrpcError(
                Code.FAILED_PRECONDITION,
                f"cannot drop what is cached of the device with serial {device.serial!r}: {e.strerror}",
            ) from None
        point.mkdir(parents=True, exist_ok=True)
        flags = syscalls.MS_RDONLY if read_only else 0
        try:
            mount_when_ready(source, point, device.fstype, flags | syscalls.MS_NODEV, wait)
        except OSError as e:
            raise TtrpcError(
                Code.FAILED_PRECONDITION,
                f"cannot mount {device.fstype} from the device with serial {device.serial!r}: {e.strerror}",
            ) from None
        state.mounts.append(point)
        if device.subdir and not (point / device.subdir).is_dir():
            raise TtrpcError(
                Code.NOT_FOUND, f"the device {device.serial!r} has no directory {device.subdir!r}"
            )

    def _release(self, state: MountedRootfs) -> None:
        for point in reversed(state.mounts):
            try:
                syscalls.umount(str(point))
            except OSError as e:
                if e.errno == errno.EINVAL:
                    continue  # not mounted
                log.warning("%s; detaching it", e)
                with contextlib.suppress(OSError):
                    syscalls.umount(str(point), syscalls.MNT_DETACH)
        shutil.rmtree(self.mnt_dir / state.container_id, ignore_errors=True)
        with contextlib.suppress(OSError):
            state.path.rmdir()

    def get(self, container_id: str) -> MountedRootfs:
        validate.container_id(container_id)
        try:
            return self.mounted[container_id]
        except KeyError:
            raise TtrpcError(Code.NOT_FOUND, f"no rootfs is mounted for container {container_id}") from None

    def sync(self, container_id: str) -> None:
        """Makes the upper filesystem consistent on its device so the host can read it."""
        state = self.get(container_id)
        fd = os.open(state.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syscalls.syncfs(fd)
        finally:
            os.close(fd)
        if state.upper is not None:
            fd = os.open(state.upper, os.O_RDONLY | os.O_DIRECTORY)
            try:
                syscalls.syncfs(fd)
                syscalls.freeze_thaw(fd)
            finally:
                os.close(fd)

    def upper_of(self, container_id: str) -> Path:
        """The upper directory of a container's ext4 writable layer. The export reads it through
        the mounted filesystem, whose page cache holds every completed write: the device need
        not be synced for it (a sync flushes through to the host's disk, 0.3 to 0.8 s under TCG)."""
        state = self.get(container_id)
        if state.upper_dir is None:
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"the rootfs of container {container_id} has no writable disk"
            )
        return state.upper_dir

    def mount_upper_device(self, device: pb.BlockDevice, name: str) -> tuple[MountedRootfs, Path]:
        """Mount a writable layer that no rootfs uses at <mnt>/<name>/disk; it and its upper dir."""
        validate.serial(device.serial)
        validate.subdir(device.subdir)
        if device.fstype != "ext4":
            raise validate.InvalidRequest(f"a writable layer is ext4, not {device.fstype!r}")
        state = MountedRootfs(name, self.mnt_dir / name / "disk")
        # Read-write, so that ext4 replays its journal; nothing on it is run or opened as a device.
        self._mount_device(device, state.path, read_only=False, state=state, wait=self.device_wait)
        upper = state.path / validate.subdir(device.subdir) / "upper"
        if not upper.is_dir():
            self._release(state)
            raise TtrpcError(Code.NOT_FOUND, f"the device {device.serial!r} holds no upper directory")
        return state, upper

    def unmount_upper_device(self, state: MountedRootfs) -> None:
        self._release(state)

    def unmount(self, container_id: str) -> None:
        """Syncs and unmounts the rootfs. A failed sync still unmounts (which writes what it
        can), then fails the call with a sentence: the host must not take the layer as whole."""
        state = self.get(container_id)
        failed: OSError | None = None
        try:
            self.sync(container_id)
        except OSError as e:
            failed = e
            log.error("syncing the rootfs of container %s at %s failed: %s", container_id, state.path, e)
        self._release(state)
        del self.mounted[container_id]
        if failed is not None:
            where = state.upper or state.path
            raise TtrpcError(
                Code.DATA_LOSS,
                f"syncing the rootfs of container {container_id} ({where}) failed: {failed.strerror}; "
                "its last writes may not have reached its disk",
            )
        log.info("unmounted the rootfs of container %s", container_id)

    def unmount_all(self) -> None:
        for cid in list(self.mounted):
            try:
                self.unmount(cid)
            except OSError as e:
                log.warning("container %s: %s", cid, e)
