"""The writable layer: an ext4 image holding the guest's overlay upper and work dirs.

The image's root holds `upper/` and `work/` (UPPER_DIR, WORK_DIR), the
guest's overlayfs upperdir and workdir. It starts as a copy of the
snapshot's upper directory (mkfs.ext4 -d keeps ownership, modes, times,
xattrs, hard links and whiteout devices) and is mirrored back into it by
write_back(), in overlayfs's own format, so containerd's differ and
`nerdctl commit` see the container's changes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

from spinbox.storage.errors import StorageError
from spinbox.storage.system import make_sparse_file, mounted, os_error, remove_file, run

UPPER_DIR = "upper"
WORK_DIR = "work"

# Overlay bookkeeping that refers to the guest's own file systems (file handles,
# copy-up state) and means nothing in the host's snapshot.
GUEST_ONLY_XATTRS = frozenset(
    f"trusted.overlay.{name}" for name in ("origin", "impure", "nlink", "upper", "uuid")
)

# ext4 superblock: 1024 bytes in; s_feature_incompat at 0x60; RECOVER = the journal needs replay.
_SUPERBLOCK_OFFSET = 1024
_INCOMPAT_OFFSET = 0x60
_INCOMPAT_RECOVER = 0x4


def mkfs_ext4_argv(image: Path, seed: Path) -> list[str]:
    # The image is a new sparse file, which reads as zeros: the journal need not be
    # written out (64 MiB per VM otherwise). 256-byte inodes hold nanosecond times.
    return [
        "mkfs.ext4",
        "-q",
        "-F",
        "-m", "0",
        "-I", "256",
        "-b", "4096",
        "-E", "lazy_journal_init=1",
        "-L", "spinbox-upper",
        "-d", str(seed),
        str(image),
    ]  # fmt: skip


def create_upper_image(image: Path, size_mib: int, snapshot_upper: Path, scratch: Path) -> None:
    """Create the sparse ext4 image `image`, seeded with the snapshot's upper directory."""
    seed = scratch / "seed"
    try:
        make_sparse_file(image, size_mib * 1024 * 1024)
        (seed / UPPER_DIR).mkdir(parents=True)
        (seed / WORK_DIR).mkdir(mode=0o700)
        st = os.stat(snapshot_upper)
        os.chown(seed / UPPER_DIR, st.st_uid, st.st_gid)
        os.chmod(seed / UPPER_DIR, stat.S_IMODE(st.st_mode))
        what = f"creating the writable layer {image} ({size_mib} MiB) from {snapshot_upper}"
        if any(os.scandir(snapshot_upper)):
            with mounted(snapshot_upper, seed / UPPER_DIR, "none", ("bind", "ro"), what):
                run(mkfs_ext4_argv(image, seed), what, space_on=image)
            # mkfs.ext4 -d (e2fsprogs 1.47.0) keeps whole seconds only: restore the nanoseconds.
            with mounted(image, seed / WORK_DIR, "ext4", ("rw", "loop"), what):
                _copy_times(snapshot_upper, seed / WORK_DIR / UPPER_DIR)
        else:
            run(mkfs_ext4_argv(image, seed), what, space_on=image)
    except OSError as exc:
        remove_file(image)
        raise os_error(exc, f"creating the writable layer {image}") from exc
    except StorageError as exc:
        remove_file(image)
        if "Could not allocate block" in str(exc) or "no space left" in str(exc):
            raise StorageError(
                f"the snapshot's upper directory {snapshot_upper} does not fit in a {size_mib} MiB"
                " writable layer, or the file system holding it is full"
            ) from exc
        raise
    finally:
        shutil.rmtree(seed, ignore_errors=True)


def _copy_times(source: Path, dest: Path) -> None:
    for directory, dirs, files in os.walk(source):
        relative = Path(directory).relative_to(source)
        for name in (*dirs, *files, ""):
            st = os.lstat(Path(directory) / name)
            os.utime(dest / relative / name, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def needs_recovery(image: Path) -> bool:
    """Whether the ext4 journal holds changes not yet written in place (not cleanly unmounted)."""
    with open(image, "rb") as file:
        file.seek(_SUPERBLOCK_OFFSET + _INCOMPAT_OFFSET)
        (incompat,) = struct.unpack("<I", file.read(4))
    return bool(incompat & _INCOMPAT_RECOVER)


def write_back(image: Path, snapshot_upper: Path, scratch: Path) -> None:
    """Mirror the image's upper/ into the snapshot's upper directory.

    The guest has synced or unmounted the file system. When its journal still
    needs replaying, a copy of the image is mounted instead, so the image
    itself is never written by the host.
    """
    mountpoint = scratch / f"writeback.{uuid.uuid4().hex[:8]}"
    copy: Path | None = None
    try:
        mountpoint.mkdir(mode=0o700)
        source = image
        options: tuple[str, ...] = ("ro", "loop", "noload")
        if needs_recovery(image):
            copy = scratch / f"{mountpoint.name}.ext4"
            run(["cp", "--sparse=always", str(image), str(copy)], f"copying the writable layer {image}", copy)
            # A private copy: mounting it read-write lets the kernel replay the journal.
            source, options = copy, ("rw", "loop")
        with mounted(source, mountpoint, "ext4", options, f"mounting the writable layer {image}"):
            upper = mountpoint / UPPER_DIR
            if not upper.is_dir():
                raise StorageError(f"the writable layer {image} has no {UPPER_DIR}/ directory")
            _Mirror().sync_dir(upper, snapshot_upper)
    except OSError as exc:
        raise os_error(exc, f"writing the writable layer back into {snapshot_upper}", snapshot_upper) from exc
    finally:
        with contextlib.suppress(OSError):
            mountpoint.rmdir()
        if copy is not None:
            remove_file(copy)


class _Mirror:
    """Makes a directory tree equal to another: content, metadata, whiteouts, hard links."""

    def __init__(self) -> None:
        self.linked: dict[tuple[int, int], Path] = {}  # source (dev, ino) → first destination path

    def sync_dir(self, source: Path, dest: Path) -> None:
        wanted = {entry.name: entry for entry in os.scandir(source)}
        for entry in os.scandir(dest):
            if entry.name not in wanted:
                _remove(Path(entry.path))
        for name, entry in sorted(wanted.items()):
            self.sync_entry(entry, dest / name)
        _copy_metadata(source, dest)

    def sync_entry(self, entry: os.DirEntry[str], dest: Path) -> None:
        st = entry.stat(follow_symlinks=False)
        try:
            have: os.stat_result | None = os.lstat(dest)
        except FileNotFoundError:
            have = None
        if stat.S_ISDIR(st.st_mode):
            if have is not None and not stat.S_ISDIR(have.st_mode):
                _remove(dest)
                have = None
            if have is None:
                dest.mkdir(mode=0o700)
            self.sync_dir(Path(entry.path), dest)
            return
        if st.st_nlink > 1:
            first = self.linked.get((st.st_dev, st.st_ino))
            if first is not None:
                if have is None or not os.path.samestat(have, os.lstat(first)):
                    self._replace(dest, lambda temp: os.link(first, temp))
                return
            self.linked[(st.st_dev, st.st_ino)] = dest
        if have is not None and _same_file(st, have, Path(entry.path), dest):
            _copy_metadata(Path(entry.path), dest)
            return
        self._replace(dest, lambda temp: _create_like(Path(entry.path), st, temp))
        _copy_metadata(Path(entry.path), dest)

    @staticmethod
    def _replace(dest: Path, create: Callable[[Path], None]) -> None:
        """Create `dest` anew; an existing one is replaced only once the new one is complete."""
        if not os.path.lexists(dest):
            try:
                create(dest)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(dest)
                raise
            return
        temp = dest.with_name(f".spinbox-wb.{uuid.uuid4().hex[:8]}")
        try:
            create(temp)
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.rename(temp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise


def _same_file(st: os.stat_result, have: os.stat_result, source: Path, dest: Path) -> bool:
    """Cheap equality, as rsync's quick check: same type, size and modification time."""
    if stat.S_IFMT(st.st_mode) != stat.S_IFMT(have.st_mode):
        return False
    if stat.S_ISLNK(st.st_mode):
        return os.readlink(source) == os.readlink(dest)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return st.st_rdev == have.st_rdev
    if stat.S_ISREG(st.st_mode):
        return (st.st_size, st.st_mtime_ns, st.st_nlink) == (have.st_size, have.st_mtime_ns, have.st_nlink)
    return True


def _create_like(source: Path, st: os.stat_result, dest: Path) -> None:
    mode = stat.S_IFMT(st.st_mode)
    if stat.S_ISREG(mode):
        shutil.copyfile(source, dest, follow_symlinks=False)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(source), dest)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
        os.mknod(dest, mode | 0o600, st.st_rdev)
    elif stat.S_ISSOCK(mode):
        os.mknod(dest, mode | 0o600)
    else:
        raise StorageError(f"{source} has a file type spinbox cannot write back")


def _copy_metadata(source: Path, dest: Path) -> None:
    """Ownership, mode, extended attributes (exactly), then times."""
    st = os.lstat(source)
    os.chown(dest, st.st_uid, st.st_gid, follow_symlinks=False)
    link = stat.S_ISLNK(st.st_mode)
    if not link:
        os.chmod(dest, stat.S_IMODE(st.st_mode))
    _copy_xattrs(source, dest)
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_xattrs(source: Path, dest: Path) -> None:
    try:
        wanted = {
            name: os.getxattr(source, name, follow_symlinks=False)
            for name in os.listxattr(source, follow_symlinks=False)
            if name not in GUEST_ONLY_XATTRS
        }
        have = os.listxattr(dest, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in have:
        if name not in wanted:
            with contextlib.suppress(OSError):
                os.removexattr(dest, name, follow_symlinks=False)
    for name, value in wanted.items():
        try:
            if os.getxattr(dest, name, follow_symlinks=False) == value:
                continue
        except OSError:
            pass
        os.setxattr(dest, name, value, follow_symlinks=False)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
