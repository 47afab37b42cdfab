"""A guest restored from a template becomes itself: fresh entropy, the host's clock.

Every VM restored from one template starts with the same kernel RNG state and
the clock of the moment the template was saved. The host's seed is credited to
the pool and the CRNG reseeded at once, so nothing drawn after this (the boot
id, which the kernel makes at its first read, included) is shared with another
VM.

The template's guest stops reporting free pages before it is saved (see
stop_page_reporting), so no VM restored from it reports any.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

from guest.vminitd import syscalls
from guest.vminitd.validate import InvalidRequest

log = logging.getLogger(__name__)

MIN_SEED = 32
MAX_SEED = 512
BALLOON_DRIVER = Path("/sys/bus/virtio/drivers/virtio_balloon")


class RefreshError(InvalidRequest):
    """A Refresh request that cannot be honoured."""


def apply(seed: bytes, realtime_ns: int) -> None:
    if not MIN_SEED <= len(seed) <= MAX_SEED:
        raise RefreshError(f"the entropy seed must be {MIN_SEED} to {MAX_SEED} bytes, not {len(seed)}")
    if realtime_ns < 0:
        raise RefreshError(f"realtime_ns must not be negative, not {realtime_ns}")
    syscalls.add_entropy(seed)
    syscalls.reseed_crng()
    if realtime_ns:
        time.clock_settime_ns(time.CLOCK_REALTIME, realtime_ns)


def warm() -> None:
    """Imports what later requests need, so that a restored VM does not pay for it."""
    for name in ("guest.vminitd.network", "guest.vminitd.upperstream"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            log.info("not preloading %s: %s", name, e)


def stop_page_reporting(driver: Path = BALLOON_DRIVER) -> list[str]:
    """Unbind the balloon driver, which ends free page reporting; returns the devices unbound.

    A VM restored from a template maps the template's RAM private, and QEMU
    discards a reported page by punching a hole in the RAM's file (shared by
    every VM restored from it); spinbox hands restored VMs that RAM sealed, so
    the punch fails, the page stays, and QEMU logs an error for every report.
    """
    unbound = []
    for device in sorted(driver.glob("virtio*")):
        try:
            (driver / "unbind").write_text(device.name)
        except OSError as e:
            log.warning("cannot stop free page reporting of %s: %s", device.name, e)
            continue
        unbound.append(device.name)
    return unbound
