"""Fixtures shared by the e2e modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import spinbox_stack
from tests.harness.systemd import PrivateSystemd


@pytest.fixture(scope="module")
def stack(systemd: PrivateSystemd, guest_image: Path) -> Iterator[PrivateSystemd]:
    """spinbox.service running for one test module."""
    with spinbox_stack(systemd, guest_image):
        yield systemd
