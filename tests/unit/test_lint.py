"""ruff and mypy are tests: a lint or type error is a red test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
SOURCES = [p for p in ("spinbox", "guest", "tests", "bench", "kernel") if (TOP / p).exists()]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=TOP, capture_output=True, text=True, check=False)


def test_ruff_check() -> None:
    result = run(sys.executable, "-m", "ruff", "check", *SOURCES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = run(sys.executable, "-m", "ruff", "format", "--check", *SOURCES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    targets = [p for p in ("spinbox", "guest") if (TOP / p).exists()]
    result = run(sys.executable, "-m", "mypy", *targets)
    assert result.returncode == 0, result.stdout + result.stderr
