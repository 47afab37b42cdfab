"""What a Kubernetes pod may ask of the node that a VM cannot give.

A pod's VM has its own kernel: its network, IPC and PID namespaces are the
VM's, and mounts made on the host never propagate into it (nor back). A CRI
container that asks for the host's namespaces or for shared or slave mount
propagation is refused with a sentence, rather than silently getting
something else (a host-network pod must never get another network)."""

from __future__ import annotations

import re
from typing import Any

from spinbox.shim.cri import CONTAINER_TYPE_ANNOTATION

_HOST_NAMESPACES = {
    "network": "the host's network (hostNetwork)",
    "ipc": "the host's IPC namespace (hostIPC)",
    "pid": "the host's PID namespace (hostPID)",
}
_PROPAGATING = {"shared", "rshared", "slave", "rslave"}
_NAMESPACE_PATH = re.compile(r"^/proc/([0-9]+)/ns/[a-z]+$")


class PodCheckError(Exception):
    pass


def check_cri_spec(container_id: str, spec: dict[str, Any], annotations: dict[str, str]) -> None:
    """Refuses a CRI container's spec that asks for what only the host's kernel gives."""
    kind = annotations.get(CONTAINER_TYPE_ANNOTATION)
    if kind not in ("sandbox", "container"):
        return
    what = "pod sandbox" if kind == "sandbox" else "container"
    linux = spec.get("linux") or {}
    namespaces = linux.get("namespaces") or []
    types = {str(ns.get("type")) for ns in namespaces if isinstance(ns, dict)}
    for name, host in _HOST_NAMESPACES.items():
        if name not in types:
            raise PodCheckError(
                f"{what} {container_id!r} asks for {host}: spinbox runs every pod in a VM of its own, "
                f"whose kernel has its own {name} namespace; run this pod with another runtime class"
            )
    rootfs_propagation = str(linux.get("rootfsPropagation") or "")
    if rootfs_propagation in _PROPAGATING:
        raise PodCheckError(
            f"{what} {container_id!r} asks for {rootfs_propagation} mount propagation: "
            "mounts do not propagate between the host and a spinbox VM"
        )
    for mount in spec.get("mounts") or []:
        if not isinstance(mount, dict):
            continue
        options = {str(o) for o in mount.get("options") or []}
        propagation = sorted(options & _PROPAGATING)
        if propagation:
            raise PodCheckError(
                f"{what} {container_id!r} mounts {mount.get('destination')!r} with {propagation[0]} "
                "propagation (Bidirectional or HostToContainer): mounts do not propagate between "
                "the host and a spinbox VM"
            )


def check_pod_namespaces(container_id: str, spec: dict[str, Any], sandbox_pid: int) -> None:
    """A pod container may join only its sandbox's namespaces (containerd names them by the pid
    the shim reported for the sandbox, the VM's): the guest joins the sandbox's in the VM."""
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if not isinstance(ns, dict) or ns.get("type") == "network" or not ns.get("path"):
            continue
        match = _NAMESPACE_PATH.match(str(ns["path"]))
        if match is None or int(match.group(1)) != sandbox_pid:
            raise PodCheckError(
                f"container {container_id!r} joins the {ns.get('type')} namespace {ns['path']!r}, "
                "which is not its pod sandbox's: only the sandbox's namespaces exist in the pod's VM"
            )
