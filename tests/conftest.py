"""Test tiers: every test module lives under tests/unit, tests/integration or
tests/e2e and is marked with that tier, so `pytest -m unit` selects it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.fixtures import guest_image, systemd

__all__ = ["guest_image", "systemd"]

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
