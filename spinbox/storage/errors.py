"""The one error type of spinbox.storage."""

from __future__ import annotations


class StorageError(Exception):
    """A rootfs could not be prepared, written back or released; the message is a sentence for users."""
