"""A container's mounts as they travel from containerd through the shim and
spinboxd: rootfs mounts to spinbox.storage, which turns them into disks, and
the host files a volume may share into a VM."""

from __future__ import annotations

import stat
from dataclasses import dataclass


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
