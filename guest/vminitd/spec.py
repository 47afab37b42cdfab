"""A container's OCI spec as the guest's crun runs it (the guest checks what the host sent)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from guest.vminitd import validate
from guest.vminitd.config import RuntimeConfig
from guest.vminitd.podns import SANDBOX_ID_ANNOTATION, pod_namespace
from spinbox.ttrpc import Code, TtrpcError

log = logging.getLogger(__name__)

# Namespaces a container may not join by path: the paths name host objects, and the VM is the sandbox.
_DROPPED_NAMESPACES = ("network",)
# Keys of network sysctls; their dots become directories under /proc/sys.
_NET_SYSCTL = re.compile(r"^net(\.[A-Za-z0-9_-]+)+$")


def prepare_spec(
    config: RuntimeConfig,
    container_id: str,
    doc: dict[str, Any],
    rootfs: Path,
    terminal: bool,
    inits: Mapping[int, str] | None = None,
) -> None:
    """Rewrites a container's OCI spec for the guest: its rootfs, terminal, cgroup and namespaces
    (a path joins the namespace of another container in the VM: `inits` maps their init pids to
    their ids); hooks (run on the host) and network sysctls (set on the VM's namespace) leave it."""
    readonly = bool(doc.get("root", {}).get("readonly", False))
    doc["root"] = {"path": str(rootfs), "readonly": readonly}
    doc["process"]["terminal"] = terminal
    if doc.pop("hooks", None):
        log.warning("container %s: hooks run on the host, not in the guest; dropped them", container_id)
    linux = doc.setdefault("linux", {})
    if config.cgroup_parent:
        linux["cgroupsPath"] = f"/{config.cgroup_parent}/{container_id}"
    else:
        linux.pop("cgroupsPath", None)
    namespaces = linux.get("namespaces", [])
    if not isinstance(namespaces, list) or not all(isinstance(n, dict) for n in namespaces):
        raise validate.InvalidRequest("the OCI spec's linux.namespaces is not a list of objects")
    annotations = doc.get("annotations")
    sandbox = str(annotations.get(SANDBOX_ID_ANNOTATION, "")) if isinstance(annotations, dict) else ""
    kept = []
    for ns in namespaces:
        if ns.get("type") in _DROPPED_NAMESPACES:
            continue
        path = ns.pop("path", None)
        if path:
            ns["path"] = pod_namespace(str(ns.get("type")), str(path), inits or {}, sandbox)
        kept.append(ns)
    linux["namespaces"] = kept
    if config.default_personality and "personality" not in linux:
        # crun sets it in the container before its program runs (init and exec processes alike).
        linux["personality"] = {"domain": "LINUX"}
    sysctl = linux.get("sysctl")
    if isinstance(sysctl, dict):
        net = {str(k): str(v) for k, v in sysctl.items() if str(k).startswith("net.")}
        if net:
            linux["sysctl"] = {k: v for k, v in sysctl.items() if not str(k).startswith("net.")}
            apply_net_sysctls(config.proc_sys, container_id, net)


def apply_net_sysctls(proc_sys: Path, container_id: str, values: dict[str, str]) -> None:
    """Network sysctls (e.g. the CRI's net.ipv4.ip_unprivileged_port_start): the container
    shares the VM's network namespace, which is its pod's, so they are set there."""
    for key, value in values.items():
        if not _NET_SYSCTL.match(key):
            raise validate.InvalidRequest(f"the OCI spec's sysctl {key!r} is not a valid network sysctl")
        path = proc_sys.joinpath(*key.split("."))
        try:
            path.write_text(value)
        except OSError as e:
            log.warning("container %s: cannot set sysctl %s=%s: %s", container_id, key, value, e.strerror)


def check_program(rootfs: Path, doc: dict[str, Any], proc: dict[str, Any], name: str) -> None:
    mounted = [m["destination"].rstrip("/") + "/" for m in doc.get("mounts", [])]
    program: str = proc["args"][0]
    if program.startswith("/") and any(program.startswith(m) for m in mounted):
        return  # it comes from a mount; crun finds out
    if validate.executable_in_rootfs(str(rootfs), proc) is None:
        where = "" if "/" in program else " in any directory of its PATH"
        raise TtrpcError(
            Code.INVALID_ARGUMENT,
            f"the program {program!r} of {name} is not an executable file in its rootfs{where}",
        )
