"""Fixtures for the storage tests: root, a cache, and a check that nothing stays mounted."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from spinbox.storage import LayerCache
from tests.integration.storage.storage_trees import loops_on, mounts_under


@pytest.fixture(autouse=True)
def nothing_left_mounted(tmp_path: Path) -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("storage tests mount file systems and need root")
    for tool in ("mkfs.erofs", "mkfs.ext4"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    yield
    left, loops = mounts_under(tmp_path), loops_on(tmp_path)
    for target in reversed(left):  # so that a failed test does not spoil the next ones
        subprocess.run(["umount", "--lazy", target], check=False)
    assert left == []
    assert loops == []


@pytest.fixture
def cache(tmp_path: Path) -> LayerCache:
    return LayerCache(tmp_path / "cache")
