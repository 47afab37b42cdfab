"""Errors of spinbox.vm: each carries a sentence a user can act on."""

from __future__ import annotations


class VmError(Exception):
    """A VM could not be built, started or driven; the message says why."""


class VmNotRunning(VmError):
    """The VM's QEMU process is gone (e.g. found by attach after a restart)."""
