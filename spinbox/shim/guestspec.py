"""containerd's OCI spec as the guest's crun reads it: a runtime-spec
version crun accepts, and host files of bind mounts carried along."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from spinbox.api.proto import agent_pb2
from spinbox.shim.bindfiles import BIND_FILES_TOTAL, read_bind_file

log = logging.getLogger(__name__)

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


def for_guest(spec: dict[str, Any]) -> tuple[dict[str, Any], list[agent_pb2.BindFile]]:
    """The spec as the guest's runtime reads it, with the host files its bind mounts need.

    The runtime-spec version becomes one the guest's crun accepts. A bind mount
    of a regular host file of at most BIND_FILE_LIMIT bytes (BIND_FILES_TOTAL
    for all of them; nerdctl's and the
    CRI's /etc/hosts, /etc/resolv.conf, /etc/hostname) keeps its place and
    options; the file's content travels along and the guest binds its own
    copy. A host directory bound at /dev/shm (the CRI's pod shared memory) becomes
    the VM's own /dev/shm, which all the pod's containers share. Other host bind
    mounts (directories, larger files) do not exist in
    the VM: they are left out with a log line rather than failing the container.
    """
    guest = dict(spec)
    if not str(spec.get("ociVersion", "")).startswith("1.0"):
        guest["ociVersion"] = GUEST_OCI_VERSION
    mounts = spec.get("mounts") or []
    if not any(is_bind(m) for m in mounts):
        return guest, []
    kept: list[Any] = []
    files: list[agent_pb2.BindFile] = []
    total = 0
    for m in mounts:
        if not is_bind(m):
            kept.append(m)
            continue
        if m.get("destination") == GUEST_SHM and Path(str(m.get("source") or "")).is_dir():
            kept.append({**m, "source": GUEST_SHM})
            continue
        file = read_bind_file(str(m.get("source") or ""))
        if not isinstance(file, str) and total + len(file.content) > BIND_FILES_TOTAL:
            file = f"the container's bind files together would exceed {BIND_FILES_TOTAL} bytes"
        if isinstance(file, str):
            log.warning(
                "host bind mount %s of %s is not shared into the VM: %s",
                m.get("destination"),
                m.get("source"),
                file,
            )
            continue
        file.mount = len(kept)
        total += len(file.content)
        files.append(file)
        kept.append(m)
    guest["mounts"] = kept
    return guest, files
