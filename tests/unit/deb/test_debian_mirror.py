"""tools/install-test-clients takes sid from the Debian mirror the host's apt
sources name (tools/debian-mirror), one-line and deb822 files alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[3] / "tools" / "debian-mirror"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def mirror(apt_etc: Path) -> str:
    return subprocess.run(
        [sys.executable, str(TOOL), str(apt_etc)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_a_deb822_source_names_the_mirror(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb deb-src\n"
        "URIs: http://mirror.example.org/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "URIs: http://mirror.example.org/debian/\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main contrib\n"
        "Signed-By: /etc/apt/keyrings/local.gpg\n"
    )
    assert mirror(tmp_path) == "http://mirror.example.org/debian /etc/apt/keyrings/local.gpg"


def test_a_one_line_source_behind_a_proxy_names_the_mirror(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://ignored.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb http://security.debian.org/debian-security bookworm-security main\n"
        "deb [arch=amd64] http://apt-cacher.local:3142/deb.debian.org/debian bookworm main\n"
    )
    assert mirror(tmp_path) == f"http://apt-cacher.local:3142/deb.debian.org/debian {KEYRING}"


def test_without_a_debian_source_the_main_archive_is_used(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "other.sources").write_text("Types: deb\nEnabled: no\nURIs: http://x/\n")
    assert mirror(tmp_path) == f"http://deb.debian.org/debian {KEYRING}"
