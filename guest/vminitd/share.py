"""The VM's virtio-fs share: the host directories and files of the containers' bind mounts.

The host binds each volume at <container id>/<n> of the share (read-only
there when the mount is read-only); a container's mount gets the guest's view
of it as its source, and crun binds it at the destination with the spec's
options.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guest.vminitd import syscalls, validate
from spinbox.api.proto import agent_pb2 as pb

log = logging.getLogger(__name__)

# The tag of the host's vhost-user-fs device (spinbox.vm.qemu.VIRTIOFS_TAG).
TAG = "spinbox"


def _is_bind(mount: Any) -> bool:
    options = mount.get("options") or []
    return bool(mount.get("type") == "bind" or "bind" in options or "rbind" in options)


class Share:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted = False

    def mount(self) -> None:
        """Mount the share (once); a VM started without one has no virtio-fs device."""
        if self.mounted:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            syscalls.mount(TAG, str(self.root), "virtiofs")
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise validate.InvalidRequest(
                    f"cannot mount the VM's shared volumes ({TAG}): {e.strerror}; "
                    "the host started this VM without a share"
                ) from None
        self.mounted = True
        log.info("mounted the host's share at %s", self.root)

    def apply(self, container_id: str, doc: dict[str, Any], shared: Sequence[pb.SharedMount]) -> None:
        """Make each shared mount's source the share's view of its volume."""
        if not shared:
            return
        mounts = doc.get("mounts", [])
        seen: set[int] = set()
        for s in shared:
            if s.mount >= len(mounts) or not isinstance(mounts[s.mount], dict):
                raise validate.InvalidRequest(
                    f"shared volume for mounts[{s.mount}]: the OCI spec has no such mount"
                )
            mount = mounts[s.mount]
            if not _is_bind(mount):
                raise validate.InvalidRequest(
                    f"shared volume for mounts[{s.mount}]: that mount is not a bind mount"
                )
            if s.mount in seen:
                raise validate.InvalidRequest(f"shared volume for mounts[{s.mount}]: given twice")
            seen.add(s.mount)
        self.mount()
        for s in shared:
            source = self.root / container_id / str(s.volume)
            if not source.exists():
                raise validate.InvalidRequest(
                    f"the bind mount at {mounts[s.mount].get('destination')}: "
                    f"the host shared no volume {container_id}/{s.volume}"
                )
            mounts[s.mount]["source"] = str(source)

    def release(self, container_id: str, mountinfo: Path = Path("/proc/self/mountinfo")) -> None:
        """Detach the guest's mounts of a deleted container's volumes (the kernel mounts each on
        first use), so that virtiofsd lets go of their host sources."""
        if not self.mounted:
            return
        prefix = f"{self.root}/{container_id}/"
        try:
            targets = [line.split()[4] for line in mountinfo.read_text().splitlines()]
        except OSError:
            return
        for target in sorted((t for t in targets if t.startswith(prefix)), reverse=True):
            try:
                syscalls.umount(target, syscalls.MNT_DETACH)
            except OSError as e:
                log.warning("cannot unmount the volume %s: %s", target, e.strerror)
