"""The host tools storage runs (mkfs.erofs, mkfs.ext4, mount) have deadlines:
one past it is killed and named in a StorageError."""

from __future__ import annotations

import time

import pytest

from spinbox.storage.errors import StorageError
from spinbox.storage.system import run


def test_a_tool_past_its_deadline_is_killed_and_named() -> None:
    started = time.monotonic()
    with pytest.raises(
        StorageError,
        match=r"^converting the layer /x to EROFS did not finish within 0.3s \(sleep was killed\)$",
    ):
        run(["sleep", "30"], "converting the layer /x to EROFS", timeout=0.3)
    assert time.monotonic() - started < 10
