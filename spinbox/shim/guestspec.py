"""containerd's OCI spec as the guest's crun reads it: a runtime-spec version crun accepts, and a
pod's /dev/shm made the VM's own. (Host directories and files of bind mounts reach the guest as
volumes: spinbox.shim.volumes.)"""

from __future__ import annotations

import os
from typing import Any

# The newest runtime-spec version the guest's crun accepts (crun 1.8 refuses
# anything but 1.0.x; the fields spinbox passes on are all in 1.0).
GUEST_OCI_VERSION = "1.0.2"
# The VM's own shared memory tmpfs: a pod's (or an IPC-sharing group's) /dev/shm on the host is a
# directory its containers bind, and the VM, which is the pod, has one of its own to bind instead.
GUEST_SHM = "/dev/shm"


def is_bind(mount: object) -> bool:
    if not isinstance(mount, dict):
        return False
    options = mount.get("options") or []
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


def is_pod_shm(mount: object) -> bool:
    """A host directory bound at /dev/shm (the CRI's pod shared memory)."""
    return (
        is_bind(mount)
        and isinstance(mount, dict)
        and mount.get("destination") == GUEST_SHM
        and os.path.isdir(str(mount.get("source") or ""))
    )


def for_guest(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the guest's runtime reads it.

    The runtime-spec version becomes one the guest's crun accepts. A host
    directory bound at /dev/shm becomes the VM's own /dev/shm, which all the
    pod's containers share. The mounts keep their order (SharedMount indexes).
    """
    guest = dict(spec)
    if not str(spec.get("ociVersion", "")).startswith("1.0"):
        guest["ociVersion"] = GUEST_OCI_VERSION
    mounts = spec.get("mounts") or []
    if any(is_pod_shm(m) for m in mounts):
        guest["mounts"] = [{**m, "source": GUEST_SHM} if is_pod_shm(m) else m for m in mounts]
    return guest
