"""The Debian package, built once per session with tools/build-deb (fixture
`spinbox_deb`), for the tests that install it."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SpinboxDeb:
    path: Path
    files: frozenset[str]  # installed paths, e.g. "/usr/bin/spinboxctl"

    @property
    def commands(self) -> list[str]:
        return sorted(f for f in self.files if f.startswith(("/usr/bin/", "/usr/sbin/")))


@pytest.fixture(scope="session")
def spinbox_deb() -> SpinboxDeb:
    if os.geteuid() != 0:
        pytest.skip("building and installing the package needs root")
    # The wheels Debian lacks come from the venv's pip (this interpreter's).
    env = {**os.environ, "VENV": sys.prefix}
    result = subprocess.run(
        [str(TOP / "tools" / "build-deb")], capture_output=True, text=True, env=env, check=False, timeout=600
    )
    assert result.returncode == 0, f"tools/build-deb failed:\n{result.stderr}"
    (deb,) = sorted((TOP / "dist").glob("spinbox_*.deb"))
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    files = frozenset(
        line.split()[5].removeprefix(".") for line in listing.splitlines() if not line.startswith("d")
    )
    return SpinboxDeb(deb, files)
