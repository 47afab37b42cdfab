"""A container's rootfs mounts as they travel from containerd through the
shim and spinboxd to spinbox.storage, which turns them into disks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MountSpec:
    """One containerd mount (containerd.types.Mount without its target's use)."""

    type: str
    source: str
    target: str
    options: tuple[str, ...]
