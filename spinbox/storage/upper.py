"""The writable layer: an ext4 image holding the guest's overlay upper and work dirs.

The image's root holds `upper/` and `work/` (UPPER_DIR, WORK_DIR), the
guest's overlayfs upperdir and workdir. It starts as a copy of the
snapshot's upper directory (mkfs.ext4 -d keeps ownership, modes, times,
xattrs, hard links and whiteout devices). Once the guest has written it, the
host never mounts it: the guest streams the upper directory back
(spinbox.storage.upperstream), so containerd's differ and `nerdctl commit`
see the container's changes.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

from spinbox.storage.errors import StorageError
from spinbox.storage.system import make_sparse_file, mounted, os_error, remove_file, run

log = logging.getLogger(__name__)

UPPER_DIR = "upper"
WORK_DIR = "work"


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
            # mkfs.ext4 -d (e2fsprogs 1.47.0) keeps whole seconds only: debugfs, in user
            # space, sets the nanoseconds (the image is never mounted on the host).
            script = scratch / "times.debugfs"
            script.write_bytes(_times_script(snapshot_upper))
            _run_debugfs(["debugfs", "-w", "-f", str(script), str(image)], what)
        else:
            run(mkfs_ext4_argv(image, seed), what, space_on=image)
    except OSError as exc:
        remove_file(image)
        raise os_error(exc, f"creating the writable layer {image}") from exc
    except StorageError as exc:
        host_full = _nearly_full(image.parent)
        remove_file(image)
        if host_full:
            raise StorageError(
                f"creating the writable layer {image} failed: no space left on the file system holding "
                f"{image.parent}"
            ) from exc
        if "Could not allocate block" in str(exc) or "no space left" in str(exc):
            raise StorageError(
                f"the snapshot's upper directory {snapshot_upper} does not fit in a {size_mib} MiB"
                " writable layer, or the file system holding it is full"
            ) from exc
        raise
    finally:
        shutil.rmtree(seed, ignore_errors=True)


# Free bytes below which the file system holding a failed image is the one that was full.
NEARLY_FULL = 1024 * 1024


def _nearly_full(directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < NEARLY_FULL


def _extra(seconds: int, nanoseconds: int) -> int:
    """ext4's i_*time_extra: nanoseconds above two epoch bits (seconds beyond 32 bits)."""
    low = (seconds + 2**31) % 2**32 - 2**31
    return (nanoseconds << 2) | (((seconds - low) >> 32) & 3)


def _times_script(source: Path) -> bytes:
    """debugfs commands giving every entry under /upper the nanoseconds of its source."""
    lines = []
    for directory, dirs, files in os.walk(source):
        relative = os.fsencode(Path(directory).relative_to(source))
        for name in (*map(os.fsencode, dirs), *map(os.fsencode, files), b""):
            path = b"/".join(p for p in (UPPER_DIR.encode(), relative, name) if p and p != b".")
            if b"\n" in path:
                log.warning(
                    "%s keeps whole-second times: its name holds a newline", Path(directory) / name.decode()
                )
                continue
            st = os.lstat(os.path.join(os.fsencode(directory), name) if name else directory)
            quoted = b'"/' + path.replace(b'"', b'""') + b'"'
            for field, ns in ((b"atime", st.st_atime_ns), (b"mtime", st.st_mtime_ns)):
                seconds, nanoseconds = divmod(ns, 1_000_000_000)
                lines.append(b"sif %s %s_extra %d" % (quoted, field, _extra(seconds, nanoseconds)))
    return b"\n".join(lines) + b"\n"


def _run_debugfs(argv: list[str], what: str) -> None:
    """debugfs exits 0 whatever its commands did: its complaints on stderr are the failure."""
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    complaints = [
        line
        for line in result.stderr.decode(errors="replace").splitlines()
        if line.strip() and not line.startswith("debugfs ")
    ]
    if result.returncode != 0 or complaints:
        detail = " ".join(complaints)[:300] or f"exit status {result.returncode}"
        raise StorageError(f"{what} failed: debugfs: {detail}")
