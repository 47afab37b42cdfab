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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path

from spinbox.storage.system import remove_tree

log = logging.getLogger(__name__)


class KeptStorage:
    """The per-VM storage directories spinboxd keeps for a person to read, as sentences."""

    def __init__(self) -> None:
        self.sentences: dict[Path, str] = {}

    def keep(self, directory: Path, why: str) -> None:
        sentence = f"{directory}: {why}; kept (remove it once its data is saved)"
        self.sentences[directory] = sentence
        log.error("%s", sentence)

    def forget(self, directory: Path) -> None:
        self.sentences.pop(directory, None)

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
