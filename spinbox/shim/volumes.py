"""The OCI spec's bind mounts of host directories and files, as volumes of the VM's virtio-fs share.

spinboxd binds each source into the VM's share (read-only on the host for a
read-only mount); the guest makes its view of the share the mount's source
and binds it at the destination with the spec's options. A bind mount that a
VM cannot honour fails the create with a sentence naming it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from spinbox.api.proto import agent_pb2
from spinbox.mounts import Volume, unshareable
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
    volumes: tuple[Volume, ...] = ()
    shared: tuple[agent_pb2.SharedMount, ...] = ()


def volumes_of(spec: dict[str, Any], container_id: str) -> Volumes:
    """The volumes a spec's bind mounts need; VolumeError names a mount a VM cannot honour."""
    volumes: list[Volume] = []
    shared: list[agent_pb2.SharedMount] = []
    for index, mount in enumerate(spec.get("mounts") or []):
        if not is_bind(mount) or is_pod_shm(mount):
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
        shared.append(agent_pb2.SharedMount(mount=index, volume=len(volumes)))
        volumes.append(Volume(source=source, read_only="ro" in options, recursive="rbind" in options))
    return Volumes(tuple(volumes), tuple(shared))
