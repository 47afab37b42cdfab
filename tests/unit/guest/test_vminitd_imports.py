"""What vminitd's boot imports: the guest's Python runs emulated at boot, so
modules only some requests need load at those requests, not before Ping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[3]
# Loaded at the first request that needs them (or only on a host).
NOT_AT_BOOT = (
    "argparse",
    "dataclasses",
    "json",
    "shutil",
    "spinbox.ttrpc.client",
    "guest.vminitd.containers",
    "guest.vminitd.crun",
    "guest.vminitd.process_stdio",
    "guest.vminitd.spec",
    "guest.vminitd.rootfs",
    "guest.vminitd.stats",
    "guest.vminitd.network",
    "guest.vminitd.upperstream",
)


def test_the_agents_boot_imports_only_what_serving_needs() -> None:
    code = (
        "import sys\n"
        "import guest.vminitd.__main__\n"
        f"print(' '.join(m for m in {NOT_AT_BOOT!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=TOP, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []


def test_the_client_still_imports_by_name() -> None:
    from spinbox.ttrpc import Client
    from spinbox.ttrpc.client import Client as Direct

    assert Client is Direct
