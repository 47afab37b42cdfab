"""Rootfs storage for spinbox VMs: containerd mounts → EROFS layer disks and a writable ext4 disk.

See spinbox.storage.rootfs for the scheme, spinbox.storage.cache for the layer cache.
"""

from __future__ import annotations

from spinbox.mounts import MountSpec
from spinbox.storage.cache import LayerCache
from spinbox.storage.errors import StorageError
from spinbox.storage.rootfs import BlockImage, PreparedRootfs, prepare_rootfs

__all__ = ["BlockImage", "LayerCache", "MountSpec", "PreparedRootfs", "StorageError", "prepare_rootfs"]
