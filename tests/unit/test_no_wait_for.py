"""No `asyncio.wait_for` in spinbox/ or guest/: on Python 3.11 it drops a cancellation that comes
as the awaited call completes, so a caller past its deadline (a ttrpc call's, a D-Bus call's) runs
on. `async with asyncio.timeout(...)` gives the same deadline and keeps the cancellation."""

from __future__ import annotations

import ast
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]


def test_no_module_uses_asyncio_wait_for() -> None:
    found = []
    for part in ("spinbox", "guest"):
        for path in sorted((TOP / part).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                attribute = (
                    isinstance(node, ast.Attribute)
                    and node.attr == "wait_for"
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "asyncio"
                )
                imported = (
                    isinstance(node, ast.ImportFrom)
                    and node.module == "asyncio"
                    and any(alias.name == "wait_for" for alias in node.names)
                )
                if attribute or imported:
                    found.append(f"{path.relative_to(TOP)}:{getattr(node, 'lineno', 0)}")
    assert found == []
