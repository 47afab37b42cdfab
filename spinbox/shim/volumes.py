"""The OCI spec's bind mounts of host directories and files, as volumes of the VM's virtio-fs share.

spinboxd binds each source into the VM's share (read-only on the host for a
read-only mount); the guest makes its view of the share the mount's source
and binds it at the destination with the spec's options. A bind mount that a
VM cannot honour fails the create with a sentence naming it.

A recursive bind (rbind) gives what runc gives: each host mount below its
source becomes a volume of its own with that mount's own flags, bound in the
guest below the destination after its parent. A read-only bind makes only its
top read-only (a writable tmpfs below it stays writable, a read-only mount stays
read-only); "rro" makes every one of them read-only. The share holds no host
mount point: its copies are of single mounts, so the host can unmount a submount
and remove its mount point while the container runs, as with runc.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from typing import Any

from spinbox.api.proto import agent_pb2
from spinbox.mounts import MOUNTINFO, Submount, Volume, submounts, unshareable
from spinbox.shim.guestspec import is_bind, is_pod_shm

log = logging.getLogger(__name__)

# Propagation the VM cannot give: the container's mounts would have to reach the host.
_SHARED_PROPAGATION = ("shared", "rshared")
# Propagation from the host that stops at the share: later host mounts below the source.
_SLAVE_PROPAGATION = ("slave", "rslave")


class VolumeError(Exception):
    pass


@dataclass(frozen=True)
class Volumes:
    """The host directories a spec's binds give its VM, and where the guest binds them."""

    volumes: tuple[Volume, ...] = ()
    shared: tuple[agent_pb2.SharedMount, ...] = ()


def volumes_of(
    spec: dict[str, Any], container_id: str, mountinfo: str | os.PathLike[str] = MOUNTINFO
) -> Volumes:
    """The volumes a spec's bind mounts need; VolumeError names a mount a VM cannot honour.

    The host mounts below a recursive bind's source join the spec's mounts (the
    guest binds each after its parent); the SharedMount indexes are of those mounts.
    """
    volumes: list[Volume] = []
    shared: list[agent_pb2.SharedMount] = []
    mounts: list[Any] = []
    for mount in spec.get("mounts") or []:
        if not is_bind(mount) or is_pod_shm(mount):
            mounts.append(mount)
            continue
        source = str(mount.get("source") or "")
        destination = str(mount.get("destination") or "")
        options = [str(o) for o in mount.get("options") or []]
        what = f"the bind mount of {source or '(no source)'} at {destination or '(no destination)'}"
        if not os.path.isabs(source):
            raise VolumeError(f"{what}: its source is not an absolute host path")
        try:
            info = os.stat(source)
        except OSError as error:
            raise VolumeError(f"{what}: cannot use its source: {error.strerror}") from None
        kind = unshareable(info.st_mode)
        if kind is not None:
            raise VolumeError(
                f"{what}: the source is {kind}, which cannot be shared into the container's VM "
                "(spinbox shares host directories and regular files only)"
            )
        if any(o in _SHARED_PROPAGATION for o in options):
            raise VolumeError(
                f"{what}: it asks for shared (bidirectional) mount propagation, which a VM cannot give: "
                "mounts made inside the VM never reach the host"
            )
        if any(o in _SLAVE_PROPAGATION for o in options):
            log.warning(
                "container %s: %s: mounts the host makes below the source later do not reach the VM "
                "(slave propagation stops at the VM's share)",
                container_id,
                what,
            )
        recursive_read_only = "rro" in options
        if recursive_read_only:
            # Every mount of the tree is a bind of its own, each made read-only.
            mount = {**mount, "options": ["ro" if o == "rro" else o for o in options]}
        shared.append(agent_pb2.SharedMount(mount=len(mounts), volume=len(volumes)))
        volumes.append(Volume(source, read_only="ro" in options or recursive_read_only, recursive=False))
        mounts.append(mount)
        if "rbind" not in options or not stat.S_ISDIR(info.st_mode):
            continue
        for sub in _submounts_of(source, what, mountinfo):
            read_only = sub.read_only or recursive_read_only
            shared.append(agent_pb2.SharedMount(mount=len(mounts), volume=len(volumes)))
            volumes.append(Volume(sub.target, read_only=read_only, recursive=False))
            below = os.path.relpath(sub.target, os.path.realpath(source))
            mounts.append(
                {
                    "destination": f"{destination.rstrip('/')}/{below}",
                    "type": "bind",
                    "source": sub.target,
                    "options": ["bind", "ro" if read_only else "rw"],
                }
            )
    if spec.get("mounts"):
        spec["mounts"] = mounts
    return Volumes(tuple(volumes), tuple(shared))


def _submounts_of(source: str, what: str, mountinfo: str | os.PathLike[str]) -> list[Submount]:
    """The host mounts below a recursive bind's source that a VM can be given; the others are
    logged (a socket or device file bound over a file there), not shared."""
    try:
        found = submounts(source, mountinfo)
    except OSError as error:
        raise VolumeError(f"{what}: cannot read the host's mount table: {error.strerror}") from None
    given = []
    for sub in found:
        try:
            kind = unshareable(os.stat(sub.target).st_mode)
        except OSError as error:
            kind = f"not usable ({error.strerror})"
        if kind is not None:
            log.warning("%s: the host mount at %s is %s and is not given to the VM", what, sub.target, kind)
            continue
        given.append(sub)
    return given
