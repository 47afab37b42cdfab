"""System containers: systemd as a container's init, and privileged containers that run
containers of their own (Docker, critest's privileged specs).

The VM is the boundary, so inside it such a container gets what it needs: its own
cgroup namespace with a writable cgroup2 mount (a delegated subtree), the guest's
kernel modules read-only for its modprobe, and, with systemd as init, tmpfs on
/run, /run/lock and /tmp, `container=` in its environment, and SIGRTMIN+3 (systemd's
"halt") for the SIGTERM that `ctr task kill` and `nerdctl stop` send.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path, PurePosixPath
from typing import Any

from guest.vminitd import validate
from guest.vminitd.reaper import exit_code

log = logging.getLogger(__name__)

# systemd treats SIGTERM as "re-execute yourself"; SIGRTMIN+3 asks it to halt, which in a
# container ends PID 1 once every unit stopped.
SYSTEMD_STOP_SIGNAL = signal.SIGRTMIN + 3
SYSTEMD_NAMES = ("systemd",)
# Where systemd expects a fresh tmpfs, with the options systemd-nspawn and podman give them.
SYSTEMD_TMPFS = (
    ("/run", "mode=755"),
    ("/run/lock", "mode=1777,size=5m"),
    ("/tmp", "mode=1777"),
)
CGROUP_MOUNT = "/sys/fs/cgroup"
CONTAINER_ENV = "container=spinbox"


def capabilities(doc: dict[str, Any]) -> set[str]:
    caps = doc.get("process", {}).get("capabilities") or {}
    bounding = caps.get("bounding") if isinstance(caps, dict) else None
    return {str(c) for c in bounding} if isinstance(bounding, list) else set()


def runs_systemd(doc: dict[str, Any], rootfs: Path) -> bool:
    """Whether the container's init is systemd (/sbin/init is a link to it in Debian and others)."""
    program = validate.executable_in_rootfs(str(rootfs), doc["process"])
    if program is None:
        return False
    resolved = validate.resolve_in(str(rootfs), program)
    return resolved is not None and PurePosixPath(resolved).name in SYSTEMD_NAMES


def _mounted(doc: dict[str, Any], destination: str) -> bool:
    return any(
        isinstance(m, dict) and str(m.get("destination", "")).rstrip("/") == destination.rstrip("/")
        for m in doc.get("mounts", [])
    )


def _delegate_cgroup(doc: dict[str, Any]) -> None:
    """A cgroup namespace and a writable cgroup2 mount: the container's own cgroup is its root,
    and it may create (and enable controllers in) cgroups below it."""
    linux = doc.setdefault("linux", {})
    namespaces = linux.setdefault("namespaces", [])
    if not any(ns.get("type") == "cgroup" for ns in namespaces):
        namespaces.append({"type": "cgroup"})
    mounts = doc.setdefault("mounts", [])
    for mount in mounts:
        if isinstance(mount, dict) and str(mount.get("destination", "")).rstrip("/") == CGROUP_MOUNT:
            options = [o for o in mount.get("options") or [] if o not in ("ro", "rw")]
            mount["options"] = [*options, "rw"]
            return
    mounts.append(
        {
            "destination": CGROUP_MOUNT,
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "rw"],
        }
    )


def _bind_modules(doc: dict[str, Any], kernel: str, modules_root: Path) -> None:
    source = modules_root / kernel
    destination = f"/lib/modules/{kernel}"
    if not source.is_dir() or _mounted(doc, destination) or _mounted(doc, "/lib/modules"):
        return
    if doc.get("root", {}).get("readonly"):
        log.info("container has a read-only root: no mount point for the guest's kernel modules")
        return
    doc.setdefault("mounts", []).append(
        {
            "destination": destination,
            "type": "bind",
            "source": str(source),
            "options": ["rbind", "ro", "nosuid", "nodev"],
        }
    )


def _systemd_mounts_and_env(doc: dict[str, Any]) -> None:
    mounts = doc.setdefault("mounts", [])
    for destination, options in SYSTEMD_TMPFS:
        if not _mounted(doc, destination):
            mounts.append(
                {
                    "destination": destination,
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "options": ["rw", "nosuid", "nodev", *options.split(",")],
                }
            )
    env = doc["process"].setdefault("env", [])
    if not any(str(e).startswith("container=") for e in env):
        env.append(CONTAINER_ENV)


def prepare(
    container_id: str,
    doc: dict[str, Any],
    rootfs: Path,
    kernel: str | None = None,
    modules_root: Path = Path("/lib/modules"),
) -> bool:
    """Adjusts the spec of a privileged or systemd container; True when its init is systemd."""
    caps = capabilities(doc)
    systemd = runs_systemd(doc, rootfs)
    if systemd or "CAP_SYS_ADMIN" in caps:
        _delegate_cgroup(doc)
    if "CAP_SYS_MODULE" in caps:
        _bind_modules(doc, kernel or os.uname().release, modules_root)
    if systemd:
        _systemd_mounts_and_env(doc)
        log.info("container %s runs systemd: tmpfs /run and /tmp, delegated cgroup", container_id)
    return systemd


def stop_signal(sig: int, systemd: bool) -> int:
    """The signal to send a container's init for `sig`."""
    if systemd and sig == signal.SIGTERM:
        return int(SYSTEMD_STOP_SIGNAL)
    return sig


def init_exit_code(status: int, systemd: bool) -> int:
    """The exit code of a container's init from its wait status.

    systemd that halts or powers off with CAP_SYS_BOOT calls reboot(2), which in a PID
    namespace the kernel turns into SIGINT for the namespace's init (SIGHUP for a reboot):
    that is systemd's own clean end, reported as 0. SIGINT sent from outside cannot end it
    (systemd handles it as ctrl-alt-del), so nothing else looks the same."""
    if systemd and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT:
        return 0
    return exit_code(status)
