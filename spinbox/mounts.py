"""A container's mounts as they travel from containerd through the shim and
spinboxd: rootfs mounts to spinbox.storage, which turns them into disks, and
the host files a volume may share into a VM."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

# A path, not a pathlib.Path: the shim serves without pathlib (tests/unit/test_part_imports.py).
MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountSpec:
    """One containerd mount (containerd.types.Mount without its target's use)."""

    type: str
    source: str
    target: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Volume:
    """A host directory or file for one bind mount of a container, shared into its VM."""

    source: str
    read_only: bool
    recursive: bool


@dataclass(frozen=True)
class Submount:
    """A host mount below a directory: where it is mounted, and whether it is read-only."""

    target: str
    read_only: bool


def submounts(source: str, mountinfo: str | os.PathLike[str] = MOUNTINFO) -> list[Submount]:
    """The mounts a recursive bind of `source` carries: those visible strictly below it, each
    after the mount it is mounted on (mount table order). A later mount at or above a mount
    point hides what was mounted there before."""
    root = os.path.realpath(source)
    prefix = root.rstrip("/") + "/"
    found: dict[str, bool] = {}
    with open(mountinfo, encoding="utf-8") as table:
        lines = table.read().splitlines()
    for line in lines:
        fields = line.split()
        if len(fields) < 6:
            continue
        target = _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        if target != root and not target.startswith(prefix):
            continue
        hidden = target.rstrip("/") + "/"
        for known in [k for k in found if k == target or k.startswith(hidden)]:
            del found[known]
        if target != root:
            found[target] = "ro" in fields[5].split(",")
    return [Submount(target, read_only) for target, read_only in found.items()]


def unshareable(mode: int) -> str | None:
    """What a volume's source of this st_mode is, if a VM cannot be given it (None: a directory or
    a regular file, which it can)."""
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return None
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "neither a directory nor a regular file"
