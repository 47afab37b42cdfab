"""spinbox.ttrpc runs inside the guest image, whose stdlib leaves out (among
others) urllib, which pathlib imports: the package must import without them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[3]
# Left out of the guest image by guest/mkguest (see EXCLUDED_MODULES there),
# plus pathlib, which needs urllib.
ABSENT = (
    "urllib",
    "pathlib",
    "email",
    "http",
    "ssl",
    "_ssl",
    "ctypes",
    "multiprocessing",
    "decimal",
    "tarfile",
)


def test_ttrpc_imports_without_modules_the_guest_lacks() -> None:
    code = (
        "import sys\n"
        f"for name in {ABSENT!r}:\n"
        "    sys.modules[name] = None\n"
        "import spinbox.ttrpc, spinbox.api.proto.ttrpc_pb2\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=TOP, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
