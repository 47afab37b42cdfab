"""Blocking helpers around the host tools storage uses: mkfs.erofs, mkfs.ext4, mount.

Everything here blocks; callers run it in executor threads. Every helper that
takes something (a mount, a loop device, a file) gives it back on every path.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from spinbox.storage.errors import StorageError

_NO_SPACE = ("No space left on device", "Could not allocate block", "ENOSPC")


# Deadlines of the tools storage runs: mkfs of a large layer takes minutes on
# a slow disk; a mount or unmount that has not returned in a minute is stuck.
TOOL_TIMEOUT = 900.0
MOUNT_TIMEOUT = 60.0


def run(
    argv: Sequence[str],
    what: str,
    space_on: Path | None = None,
    cwd: Path | None = None,
    timeout: float = TOOL_TIMEOUT,
) -> None:
    """Run a tool; a failure becomes a StorageError naming `what` and the tool's
    complaint, a tool past `timeout` seconds is killed and named."""
    try:
        result = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            cwd=cwd,
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise StorageError(f"{what} needs {argv[0]}, which is not installed") from exc
    except subprocess.TimeoutExpired:
        raise StorageError(f"{what} did not finish within {timeout:g}s ({argv[0]} was killed)") from None
    if result.returncode == 0:
        return
    complaint = " ".join((result.stderr.strip() or result.stdout.strip()).split())
    detail = complaint[:300] if complaint else f"exit status {result.returncode}"
    if space_on is not None and any(marker in result.stderr + result.stdout for marker in _NO_SPACE):
        raise StorageError(f"{what} failed: no space left on the file system holding {space_on}")
    raise StorageError(f"{what} failed: {argv[0]}: {detail}")


def os_error(exc: OSError, what: str, full: Path | None = None) -> StorageError:
    """A StorageError for an OSError met while doing `what`, naming a full disk plainly
    (as the one holding `full` when given: the file named by the error may be the source)."""
    where = exc.filename or "?"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = str(full) if full is not None else where
        return StorageError(f"{what} failed: no space left on the file system holding {where}")
    return StorageError(f"{what} failed: {exc.strerror or exc} ({where})")


def unmount(target: Path) -> None:
    """Unmount, falling back to a lazy unmount so nothing stays attached to the host tree."""
    try:
        result = subprocess.run(
            ["umount", str(target)], capture_output=True, check=False, timeout=MOUNT_TIMEOUT
        )
        failed = result.returncode != 0
    except subprocess.TimeoutExpired:
        failed = True
    if failed:
        subprocess.run(
            ["umount", "--lazy", str(target)], capture_output=True, check=False, timeout=MOUNT_TIMEOUT
        )


@contextlib.contextmanager
def mounted(
    source: str | Path, target: Path, fstype: str, options: Sequence[str], what: str, cwd: Path | None = None
) -> Iterator[Path]:
    """Mount for the duration of the block; image files get a loop device freed on unmount."""
    # With cwd, relative lowerdir names keep long layer lists within the option size limit.
    run(
        ["mount", "-t", fstype, "-o", ",".join(options), str(source), str(target)],
        what,
        cwd=cwd,
        timeout=MOUNT_TIMEOUT,
    )
    try:
        yield target
    finally:
        unmount(target)


def make_sparse_file(path: Path, size: int) -> None:
    with open(path, "xb") as file:
        file.truncate(size)


def remove_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def remove_tree(path: Path) -> None:
    """Remove a directory tree of ours, first unmounting whatever an interrupted step left in it."""
    with open("/proc/self/mounts") as mounts:
        targets = [line.split()[1] for line in mounts]
    prefix = str(path) + "/"
    inside = (t for t in targets if t == str(path) or t.startswith(prefix))
    for target in sorted(inside, key=len, reverse=True):
        unmount(Path(target))
    shutil.rmtree(path, ignore_errors=True)
