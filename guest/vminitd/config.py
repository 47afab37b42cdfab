"""How vminitd runs containers: the settings both the guest and a host run choose at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RuntimeConfig:
    """Where crun keeps its state and the rootfs directories, and how crun is run."""

    state_dir: Path
    rootfs_dir: Path
    crun: str = "/usr/bin/crun"
    crun_args: tuple[str, ...] = ()
    no_pivot: bool = False
    cgroup_root: Path = Path("/sys/fs/cgroup")
    # Containers get the cgroup /<cgroup_parent>/<id>; empty: crun manages no cgroups.
    cgroup_parent: str = "spinbox"
