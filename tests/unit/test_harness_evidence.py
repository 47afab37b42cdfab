"""The evidence a failed test leaves: spinboxd's state directories copied
(small files) and listed (every entry), under a directory named after the test."""

from __future__ import annotations

import os
from pathlib import Path

from tests.harness.evidence import MAX_COPIED_FILE, evidence_dir, save_tree


def test_state_tree_is_listed_and_its_small_files_copied(tmp_path: Path) -> None:
    source = tmp_path / "run-spinbox"
    (source / "vm" / "a").mkdir(parents=True)
    (source / "vm" / "a" / "state.json").write_text('{"phase": "creating"}')
    (source / "vm" / "a" / "upper.img").write_bytes(b"\0" * (MAX_COPIED_FILE + 1))
    os.mkfifo(source / "vm" / "a" / "qemu.log")
    target = tmp_path / "evidence" / "run-spinbox"

    assert save_tree(source, target) == []

    assert (target / "vm" / "a" / "state.json").read_text() == '{"phase": "creating"}'
    assert not (target / "vm" / "a" / "upper.img").exists()
    listing = (tmp_path / "evidence" / "run-spinbox.listing").read_text().splitlines()
    assert [line.split()[-1] for line in listing] == [
        "vm", "vm/a", "vm/a/qemu.log", "vm/a/state.json", "vm/a/upper.img",
    ]  # fmt: skip
    assert listing[2].startswith("p")


def test_a_missing_state_directory_is_named(tmp_path: Path) -> None:
    assert save_tree(tmp_path / "absent", tmp_path / "out") == [f"{tmp_path / 'absent'} does not exist"]


def test_each_failure_gets_its_own_directory(tmp_path: Path) -> None:
    first = evidence_dir(tmp_path, "tests/e2e/test_soak.py::test_x[containerd-2.x]")
    second = evidence_dir(tmp_path, "tests/e2e/test_soak.py::test_x[containerd-2.x]")
    assert first != second and first.is_dir() and second.is_dir()
    assert first.parent == tmp_path / "evidence"
    assert "/" not in first.name and "[" not in first.name
