"""A VM's virtio-fs share: the directory its virtiofsd serves, with the host sources bound into it.

The share is `<runtime dir>/share`, a bind mount of itself made shared, so
that virtiofsd's mount namespace (a slave copy, made when it starts) also
receives the binds added later for a pod's further containers. Each volume
is `share/<container id>/<n>`: a bind of the source made nosuid and nodev,
and read-only when the volume is, before it is attached, so no copy of it
can be written, whatever the guest remounts. Nothing here removes a user's files: mount
points are removed with rmdir/unlink only, after their unmount, and a tree
that still holds a mount is left in place and reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import stat
from pathlib import Path

from spinbox.daemon import mountapi
from spinbox.daemon.errors import Failed, InvalidArgument
from spinbox.host import find_virtiofsd
from spinbox.mounts import Volume, unshareable

__all__ = ["find_virtiofsd"]

log = logging.getLogger(__name__)

SHARE_DIR = "share"
# An empty directory a confined virtiofsd builds its root on (in its own mount namespace).
ROOT_DIR = "virtiofsd-root"
SOCKET = "virtiofs.sock"
# The virtio-fs tag the guest mounts.
TAG = "spinbox"


def share_dir(runtime_dir: Path) -> Path:
    return runtime_dir / SHARE_DIR


def virtiofsd_argv(virtiofsd: Path, share: Path | str, fd: int, sandbox: str = "namespace") -> list[str]:
    return [
        str(virtiofsd),
        f"--fd={fd}",
        "-o", f"source={share}",
        # Host changes are seen within a second; the guest's writes go to the host at once.
        "-o", "cache=auto",
        "-o", f"sandbox={sandbox}",
        # Each volume is a mount of its own: distinct st_dev in the guest, as on the host.
        "-o", "announce_submounts",
        "-o", "log_level=warn",
    ]  # fmt: skip


def root_dir(runtime_dir: Path) -> Path:
    return runtime_dir / ROOT_DIR


def prepare(share: Path) -> None:
    """The share directory, a shared bind mount of itself (blocking)."""
    share.mkdir(mode=0o700)
    mountapi.mount(share, share, mountapi.MS_BIND)
    mountapi.mount(None, share, mountapi.MS_SHARED)


def vhost_user_sockets(runtime_dir: Path) -> tuple[socket.socket, socket.socket]:
    """(virtiofsd's listening socket, QEMU's connected end): no path stays behind."""
    path = runtime_dir / SOCKET
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(1)
        # Queued in the backlog until virtiofsd accepts it.
        client.connect(str(path))
    except BaseException:
        listener.close()
        client.close()
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return listener, client


def check_volume(index: int, volume: Volume) -> None:
    if not os.path.isabs(volume.source):
        raise InvalidArgument(f"volume {index}: the source {volume.source!r} is not an absolute path")


def bind(share: Path, container_id: str, volumes: list[Volume]) -> None:
    """Bind each volume's source at share/<container id>/<n> (blocking); all or nothing."""
    directory = share / container_id
    directory.mkdir(mode=0o755)
    try:
        for index, volume in enumerate(volumes):
            _bind_one(directory / str(index), volume)
    except BaseException:
        unbind(share, container_id)
        raise


def _bind_one(target: Path, volume: Volume) -> None:
    try:
        tree = mountapi.clone_tree(volume.source, volume.recursive)
    except OSError as e:
        raise InvalidArgument(f"cannot share {volume.source} into the VM: {e.strerror}") from None
    try:
        info = os.fstat(tree)
        kind = unshareable(info.st_mode)
        if kind is not None:
            raise InvalidArgument(
                f"cannot share {volume.source} into the VM: it is {kind}, and a VM can only "
                "be given host directories and regular files"
            )
        if stat.S_ISDIR(info.st_mode):
            target.mkdir(mode=0o755)
        else:
            target.touch(mode=0o644, exist_ok=False)
        # nosuid and nodev change nothing the guest sees: the share's mounts are virtiofsd's alone.
        mountapi.restrict(tree, volume.recursive, volume.read_only, volume.source)
        mountapi.attach(tree, target)
    except OSError as e:
        raise Failed(f"cannot share {volume.source} into the VM: {e.strerror}") from None
    finally:
        os.close(tree)


def _unmount_all(path: Path) -> list[Path]:
    """Detach every mount at or below `path`; the mount points that remain."""
    for _ in range(64):
        targets = mountapi.mounts_under(path)
        if not targets:
            return []
        for target in targets:
            try:
                mountapi.detach(target)
            except OSError as e:
                log.warning("cannot unmount %s: %s", target, e.strerror)
    return mountapi.mounts_under(path)


def _remove_mount_points(directory: Path) -> None:
    """rmdir/unlink the (empty) mount points of an unmounted container directory."""
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            entry.rmdir()
        else:
            entry.unlink()
    directory.rmdir()


def unbind(share: Path, container_id: str) -> None:
    """Unmount a container's volumes and remove their mount points (blocking)."""
    directory = share / container_id
    if not directory.exists():
        return
    left = _unmount_all(directory)
    if left:
        raise Failed(f"cannot unmount the volumes {', '.join(map(str, left))}: they stay in place")
    try:
        _remove_mount_points(directory)
    except OSError as e:
        raise Failed(f"cannot remove the volume mount points in {directory}: {e.strerror}") from None


def remove_runtime_dir(runtime_dir: Path) -> None:
    """Remove a VM's runtime directory, first unmounting its share (blocking).

    A directory that still holds a mount after that is left as it is: removing
    it would reach into a user's files through the mount.
    """
    if not runtime_dir.exists():
        return
    left = _unmount_all(runtime_dir)
    if left:
        log.error(
            "not removing %s: %s still mounted there (unmount, then remove the directory)",
            runtime_dir,
            ", ".join(map(str, left)),
        )
        return
    shutil.rmtree(runtime_dir, ignore_errors=True)
