"""The kernel's mount API (open_tree, mount_setattr, move_mount) and the mount table.

A bind made with open_tree is a detached copy of the source that is made
read-only before it is attached anywhere: every copy that mount propagation
makes of it afterwards (virtiofsd's view included) is read-only too, which a
bind followed by a read-only remount does not give.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# x86_64 system call numbers (Linux 5.2+ for open_tree/move_mount, 5.12+ for mount_setattr).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 2

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str, path: str | Path) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", str(path))
    return result


def clone_tree(source: str | Path, recursive: bool) -> int:
    """A detached bind of `source` (with its submounts when `recursive`), as an fd."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    fd = _libc.syscall(_SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), ctypes.c_uint(flags))
    return _check(fd, "open_tree", source)


def restrict(tree: int, recursive: bool, read_only: bool, what: str | Path) -> None:
    """Make a detached tree nosuid and nodev, and read-only when `read_only`."""
    attr = _MountAttr(attr_set=(MOUNT_ATTR_RDONLY if read_only else 0) | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    result = _libc.syscall(
        _SYS_MOUNT_SETATTR, tree, b"", ctypes.c_uint(flags), ctypes.byref(attr), ctypes.sizeof(attr)
    )
    _check(result, "mount_setattr", what)


def attach(tree: int, target: str | Path) -> None:
    """Attach a detached tree at `target`."""
    result = _libc.syscall(
        _SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, os.fsencode(target), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)
    )
    _check(result, "move_mount", target)


def mount(source: str | Path | None, target: str | Path, flags: int) -> None:
    src = os.fsencode(source) if source is not None else None
    _check(_libc.mount(src, os.fsencode(target), None, flags, None), "mount", target)


def detach(target: str | Path) -> None:
    """Lazily unmount `target`: it leaves the tree at once, whoever still uses it."""
    _check(_libc.umount2(os.fsencode(target), MNT_DETACH), "umount", target)


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Path]:
    """Mount points at or below `path`, deepest first."""
    root = str(path)
    prefix = root.rstrip("/") + "/"
    found = []
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if len(fields) > 4:
            target = _unescape(fields[4])
            if target == root or target.startswith(prefix):
                found.append(target)
    return [Path(t) for t in sorted(set(found), key=lambda t: (t.count("/"), t), reverse=True)]
