"""A VM's writable layers are never deleted unread: the VM's storage
directory goes only once every layer in it was written back; otherwise it is
kept, named in the journal and in the manager's Leftovers property
(spinboxctl check).

Per-VM storage directories found at start with no VM state left in /run
(spinboxd or the host crashed, or the host rebooted: /run is a tmpfs) are
kept and named the same way, not written back: after a reboot the guest that
wrote them is gone, the image may be mid-write, and the containerd snapshot
they would go back into may have been removed or reused. Whoever reads them
decides (see spinboxd(8)).

A new VM with the id of one whose storage is kept (a container re-created
with the same id after a crash) is not blocked by it: the kept directory is
renamed aside, to `<id>.kept-<UTC time>`, and named under its new path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from spinbox.storage.system import remove_tree

log = logging.getLogger(__name__)


class KeptStorage:
    """The per-VM storage directories spinboxd keeps for a person to read, as sentences."""

    def __init__(self) -> None:
        self.sentences: dict[Path, str] = {}
        self.reasons: dict[Path, str] = {}

    def keep(self, directory: Path, why: str) -> None:
        sentence = f"{directory}: {why}; kept (remove it once its data is saved)"
        self.sentences[directory] = sentence
        self.reasons[directory] = why
        log.error("%s", sentence)

    def forget(self, directory: Path) -> None:
        self.sentences.pop(directory, None)
        self.reasons.pop(directory, None)

    def listed(self) -> list[str]:
        return [self.sentences[d] for d in sorted(self.sentences)]


async def keep_or_remove(kept: KeptStorage, storage_dir: str, vm_id: str, unwritten: Iterable[str]) -> None:
    """Remove a VM's storage directory, unless a writable layer in it could not
    be written back: then keep it and name it."""
    names = sorted(unwritten)
    if not storage_dir:
        return
    if names:
        kept.keep(
            Path(storage_dir),
            f"the writable layer of {', '.join(names)} (VM {vm_id}) could not be written back",
        )
    elif Path(storage_dir) in kept.sentences:
        log.error("VM %s: %s stays (an earlier writeback failed)", vm_id, storage_dir)
    else:
        await asyncio.to_thread(remove_tree, Path(storage_dir))


def move_aside(kept: KeptStorage, directory: Path, vm_id: str) -> Path | None:
    """Make way for a new VM `vm_id` whose storage directory is taken by an
    earlier one's (kept, or left by a crash): rename it to
    `<name>.kept-<UTC time>` beside it and name it there. None if there was none.
    Raises OSError when it cannot be moved (the new VM must then fail)."""
    if not directory.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = directory.with_name(f"{directory.name}.kept-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"{directory.name}.kept-{stamp}-{n}")
    os.rename(directory, target)
    why = kept.reasons.get(directory, f"storage of an earlier VM {vm_id} that nobody released")
    kept.forget(directory)
    kept.keep(target, f"moved aside from {directory} for a new VM {vm_id}: {why}")
    return target


def name_orphans(storage_root: Path, known: Iterable[str], kept: KeptStorage) -> list[Path]:
    """Per-VM storage directories under `storage_root` that no VM state names
    (crash or reboot): kept, and named in the journal."""
    if not storage_root.is_dir():
        return []
    known = set(known)
    found = []
    for directory in sorted(storage_root.iterdir()):
        if directory.is_dir() and directory.name not in known and directory not in kept.sentences:
            kept.keep(
                directory,
                f"storage of VM {directory.name} with no VM state in /run (a crash or a reboot); "
                "its writable layer may hold changes that were never written back",
            )
            found.append(directory)
    return found
