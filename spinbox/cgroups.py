"""Where a process's cgroup2 directory is, and which controllers cgroup2 offers
there (spinboxctl top reads a VM's usage there, spinboxd its memory events)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class Cgroup2Mount:
    """Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup, or .../unified on a
    hybrid host), and which of its cgroups is the mount's root ("/" unless the
    mount was made in another cgroup namespace than the reader's)."""

    path: Path
    root: str = "/"


def cgroup2_mounts(mountinfo: Path = MOUNTINFO) -> list[Cgroup2Mount]:
    """Every cgroup2 mount, in mount order (a later one may hide an earlier one)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        fields = line.split()
        # Optional fields end with "-"; the filesystem type follows it.
        if "-" in fields and fields[fields.index("-") + 1] == "cgroup2":
            mounts.append(Cgroup2Mount(Path(fields[4]), fields[3]))
    return mounts


def cgroup_of(pid: int, mounts: list[Cgroup2Mount], proc: Path = Path("/proc")) -> Path | None:
    """The cgroup2 directory of process `pid` (QEMU's is its VM's scope), through
    the last mount that shows it (None if none does)."""
    if pid <= 0:
        return None
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    cgroup = next((line[3:].rstrip("/") + "/" for line in lines if line.startswith("0::")), None)
    if cgroup is None:
        return None
    for mount in reversed(mounts):
        root = mount.root.rstrip("/") + "/"
        if cgroup.startswith(root):  # else outside the part of the hierarchy mounted there
            path = mount.path / cgroup[len(root) :].strip("/")
            if path.is_dir():
                return path
    return None


def controllers(cgroup: Path) -> set[str] | None:
    """The controllers available to the cgroup `cgroup` (its cgroup.controllers),
    or None where that cannot be read."""
    try:
        return set((cgroup / "cgroup.controllers").read_text().split())
    except OSError:
        return None


def v1_mount(controller: str, mountinfo: Path = MOUNTINFO) -> Path | None:
    """Where a cgroup v1 hierarchy holding `controller` is mounted (a hybrid host's
    /sys/fs/cgroup/memory), or None."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        after = fields[fields.index("-") + 1 :]
        # "- cgroup cgroup rw,memory": the hierarchy's controllers are among its super options.
        if len(after) >= 3 and after[0] == "cgroup" and controller in after[2].split(","):
            return Path(fields[4])
    return None
