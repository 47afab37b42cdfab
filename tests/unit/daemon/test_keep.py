"""No writable layer is deleted unread: a failed writeback keeps the VM's
storage (named in the journal and in Leftovers), and storage found with no
VM state after a crash or reboot is kept and named, never removed."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from spinbox.daemon.keep import KeptStorage, keep_or_remove, move_aside, name_orphans


def test_storage_with_an_unwritten_layer_is_kept_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = tmp_path / "vms" / "vm1"
    (storage / "rootfs-c1").mkdir(parents=True)
    (storage / "rootfs-c1" / "upper.img").write_bytes(b"user data")
    kept = KeptStorage()

    with caplog.at_level(logging.ERROR):
        asyncio.run(keep_or_remove(kept, str(storage), "vm1", {"c1"}))

    assert (storage / "rootfs-c1" / "upper.img").read_bytes() == b"user data"
    (sentence,) = kept.listed()
    assert sentence.startswith(
        f"{storage}: the writable layer of c1 (VM vm1) could not be written back; kept"
    )
    assert sentence in caplog.text
    # A later release of the same VM does not remove it either.
    asyncio.run(keep_or_remove(kept, str(storage), "vm1", set()))
    assert storage.exists()


def test_storage_goes_once_everything_is_written_back(tmp_path: Path) -> None:
    storage = tmp_path / "vms" / "vm1"
    storage.mkdir(parents=True)
    kept = KeptStorage()
    asyncio.run(keep_or_remove(kept, str(storage), "vm1", set()))
    assert not storage.exists() and kept.listed() == []


def test_storage_with_no_vm_state_is_kept_and_named(tmp_path: Path) -> None:
    root = tmp_path / "vms"
    for name in ("running", "rebooted"):
        (root / name).mkdir(parents=True)
    kept = KeptStorage()
    assert name_orphans(root, {"running"}, kept) == [root / "rebooted"]
    assert (root / "rebooted").is_dir()
    (sentence,) = kept.listed()
    assert sentence.startswith(f"{root / 'rebooted'}: storage of VM rebooted with no VM state in /run")
    assert name_orphans(tmp_path / "absent", set(), KeptStorage()) == []


def test_kept_storage_moves_aside_for_a_new_vm_of_the_same_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "vms"
    storage = root / "default-c1"
    (storage / "rootfs-c1").mkdir(parents=True)
    (storage / "rootfs-c1" / "upper.img").write_bytes(b"user data")
    kept = KeptStorage()
    asyncio.run(keep_or_remove(kept, str(storage), "default-c1", {"c1"}))

    with caplog.at_level(logging.ERROR):
        moved = move_aside(kept, storage, "default-c1")
        again = move_aside(kept, storage, "default-c1")  # nothing left in the way
    assert moved is not None and again is None
    assert not storage.exists()
    assert moved.parent == root and moved.name.startswith("default-c1.kept-")
    assert (moved / "rootfs-c1" / "upper.img").read_bytes() == b"user data"
    (sentence,) = kept.listed()
    assert sentence.startswith(
        f"{moved}: moved aside from {storage} for a new VM default-c1: "
        "the writable layer of c1 (VM default-c1) could not be written back; kept"
    )
    assert sentence in caplog.text

    # A second one in the same second gets a name of its own; one nobody kept is named too.
    storage.mkdir()
    second = move_aside(kept, storage, "default-c1")
    assert second is not None and second != moved and second.is_dir()
    assert f"{second}: moved aside from {storage} for a new VM default-c1: storage of an earlier VM" in (
        "\n".join(kept.listed())
    )
