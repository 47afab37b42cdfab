"""The error types of spinbox.storage."""

from __future__ import annotations


class StorageError(Exception):
    """A rootfs could not be prepared, written back or released; the message is a sentence for users."""


class SnapshotGone(StorageError):
    """The snapshot a writable layer was to be written back into no longer exists: containerd
    removed it with its container, so the layer has nowhere to go (as with runc, deleting a
    container deletes its changes)."""
