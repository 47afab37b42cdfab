"""doc/architecture.md stays true: every file and directory it names exists,
every package of spinbox/ and guest/ is described, and the parts' import
rules it states are the ones tests/unit/test_part_imports.py checks."""

from __future__ import annotations

import re
from pathlib import Path

from tests.unit import test_part_imports

TOP = Path(__file__).resolve().parents[2]
DOC = TOP / "doc" / "architecture.md"
# A repository path in backquotes: a top-level directory, then more path.
PATH = re.compile(r"`((?:spinbox|guest|tests|dbus|units|packaging|doc|bench|tools)/[\w./-]*)`")


def named_paths(text: str) -> list[str]:
    return sorted(set(PATH.findall(text)))


def test_every_path_the_doc_names_exists() -> None:
    paths = named_paths(DOC.read_text())
    assert len(paths) > 50
    missing = [p for p in paths if not (TOP / p).exists()]
    assert not missing, f"doc/architecture.md names files that do not exist: {missing}"


def test_the_check_catches_a_path_that_is_gone() -> None:
    assert named_paths("see `spinbox/shim/gone.py` and `guest/vminitd/`") == [
        "guest/vminitd/",
        "spinbox/shim/gone.py",
    ]
    assert not (TOP / "spinbox/shim/gone.py").exists()


def test_every_package_is_described() -> None:
    text = DOC.read_text()
    packages = [
        str(p.parent.relative_to(TOP)) + "/"
        for root in ("spinbox", "guest")
        for p in (TOP / root).glob("*/__init__.py")
        if "proto" not in p.parts
    ]
    undescribed = [p for p in packages if f"`{p}" not in text]
    assert not undescribed, f"doc/architecture.md does not describe {undescribed}"


def test_the_import_rules_are_those_checked() -> None:
    text = DOC.read_text()
    assert "`tests/unit/test_part_imports.py`" in text
    assert {"spinbox.daemon", "spinbox.vm", "spinbox.storage", "spinbox.net"} <= set(
        test_part_imports.SHIM_FORBIDDEN
    )
    assert {"spinbox.daemon", "spinbox.vm", "spinbox.storage", "spinbox.net", "spinbox.shim"} <= set(
        test_part_imports.CLI_FORBIDDEN
    )
    assert set(test_part_imports.VMINITD_SPINBOX) == {"spinbox.api", "spinbox.ttrpc"}
    leaves = re.findall(r"`(spinbox/\w+\.py)`", text.split("## The data path")[0])
    for leaf in ("spinbox/agent.py", "spinbox/mounts.py", "spinbox/busnames.py", "spinbox/busclient.py"):
        assert leaf in leaves
