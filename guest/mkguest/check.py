"""A build-time check: the image's own Python imports the entry module from the image's files.

A module the builder left out (or a shared library an extension needs) then
fails the build with its name, instead of panicking the guest at boot.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from pathlib import Path

from guest.mkguest.cpio import Entry
from guest.mkguest.errors import BuildError

# Only builtins: the check must need nothing the image might not have.
_IMPORT = "import sys\nsys.path.append('/usr/lib/python3/dist-packages')\n__import__(sys.argv[1])\n"


def can_check() -> bool:
    return os.geteuid() == 0  # chroot needs root


def check_imports(entries: list[Entry], python: str, module: str) -> None:
    with tempfile.TemporaryDirectory(prefix="spinbox-mkguest-") as tmp:
        root = Path(tmp)
        for entry in entries:
            path = root / entry.path
            if stat.S_ISDIR(entry.mode):
                path.mkdir(exist_ok=True)
            elif stat.S_ISLNK(entry.mode):
                path.symlink_to(entry.data.decode())
            elif stat.S_ISREG(entry.mode):
                path.write_bytes(entry.data)
                path.chmod(stat.S_IMODE(entry.mode))
        try:
            result = subprocess.run(
                ["chroot", tmp, python, "-SI", "-c", _IMPORT, module],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except FileNotFoundError:
            raise BuildError("chroot is not installed: apt install coreutils") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise BuildError(f"the guest image's python cannot import {module}: {lines[-1]}")
