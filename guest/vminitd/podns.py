"""A pod's shared namespaces inside its VM.

The CRI gives a pod one IPC and one UTS namespace, and one PID namespace when
the pod asks for it: containerd writes the sandbox's paths, /proc/<pid>/ns/<type>,
into each further container's spec, with the pid the runtime reported for the
sandbox, which for spinbox is the VM's on the host (the shim checks that). Inside
the VM the path means the namespace of the pod's sandbox, named by the spec's
sandbox-id annotation; without one, a path whose pid is a container's init
process in the VM names that one. vminitd joins no other process's namespaces (never its own).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from guest.vminitd import validate

# The OCI namespace types a container may join by path inside the VM, and their names under /proc/<pid>/ns.
SHAREABLE = {"ipc": "ipc", "uts": "uts", "pid": "pid"}
_PATH = re.compile(r"^/proc/([1-9][0-9]{0,9})/ns/([a-z_]+)$")


SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"


def pod_namespace(kind: str, path: str, inits: Mapping[int, str], sandbox: str = "") -> str:
    """The path of a namespace of a container of this VM that `path` names, or a refusal.

    `inits` maps the pid of every live container init process to its container's id;
    `sandbox` is the id of the pod's sandbox container the spec names, if any."""
    name = SHAREABLE.get(kind)
    if name is None:
        raise validate.InvalidRequest(
            f"the OCI spec joins the {kind} namespace {path!r}: spinbox shares only the "
            f"{', '.join(sorted(SHAREABLE))} namespaces of a pod's containers inside its VM"
        )
    match = _PATH.match(path)
    if match is None or match.group(2) != name:
        raise validate.InvalidRequest(
            f"the OCI spec's {kind} namespace path {path!r} is not /proc/<pid>/ns/{name} "
            "of a container in this VM (host namespaces do not exist inside the VM)"
        )
    pid = int(match.group(1))
    if sandbox:  # the pid is the VM's on the host, and may be anything here
        pid = next((p for p, cid in inits.items() if cid == sandbox), 0)
    if pid not in inits:
        raise validate.InvalidRequest(
            f"the OCI spec's {kind} namespace path {path!r} names no running container of this VM "
            "(its pod's sandbox has exited, or the path names a host process)"
        )
    return f"/proc/{pid}/ns/{name}"
