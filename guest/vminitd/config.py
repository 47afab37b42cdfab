"""How vminitd runs containers: the settings both the guest and a host run choose at start."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


# Values of the guest's boot path are NamedTuples (immutable, typed, keyword
# constructible) rather than frozen dataclasses, which cost about four times as
# much to define, and the guest's Python runs emulated at boot.
class RuntimeConfig(NamedTuple):
    """Where crun keeps its state and the rootfs directories, and how crun is run."""

    state_dir: Path
    rootfs_dir: Path
    crun: str = "/usr/bin/crun"
    crun_args: tuple[str, ...] = ()
    no_pivot: bool = False
    cgroup_root: Path = Path("/sys/fs/cgroup")
    # Containers get the cgroup /<cgroup_parent>/<id>; empty: crun manages no cgroups.
    cgroup_parent: str = "spinbox"
    # Where the network sysctls of a pod's namespace are written.
    proc_sys: Path = Path("/proc/sys")
    # vminitd runs crun with a fixed address layout (boot.fix_tool_layout): a container whose
    # spec names no personality is given Linux's default, which has it randomized again.
    default_personality: bool = False
