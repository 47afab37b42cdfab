"""Test tiers: every test module lives under tests/unit, tests/integration or
tests/e2e and is marked with that tier, so `pytest -m unit` selects it.

A test that fails while a private systemd runs leaves its evidence (journal,
spinboxd's state directories) under the artifacts directory, and its report
names where."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest
from _pytest._code.code import ExceptionRepr

from tests.harness.evidence import save_evidence
from tests.harness.fixtures import artifacts_dir, guest_image, systemd
from tests.harness.systemd import PrivateSystemd

__all__ = ["guest_image", "systemd"]

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    running = [v for v in funcargs.values() if isinstance(v, PrivateSystemd) and v.pid]
    if not running:
        return
    try:
        path = save_evidence(running[0], artifacts_dir(), item.nodeid)
        saved = f"evidence (journal, /run/spinbox, /var/lib/spinbox) saved in {path}"
    except Exception as error:  # the report must still say what failed
        saved = f"saving the evidence failed: {error!r}"
    longrepr = report.longrepr
    if isinstance(longrepr, ExceptionRepr):
        longrepr.addsection("spinbox evidence", saved)
        crash = longrepr.reprcrash
        if crash is not None:
            # The one-line summary (`pytest -q`, CI logs) names the path too.
            crash.message = f"{crash.message} [{saved}]"
    elif isinstance(longrepr, str):
        report.longrepr = f"{longrepr}\n{saved}"
    else:
        report.sections.append(("spinbox evidence", saved))
