"""Busybox root filesystems and OCI specs for the guest agent's tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
APPLETS = ("sh", "echo", "cat", "sleep", "ls", "stty", "head", "dd", "true", "false", "id", "env", "yes")
PATH_ENV = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"


def busybox_rootfs(root: Path) -> Path:
    """A minimal rootfs: /bin/busybox, applet links and the usual mount points."""
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        link = root / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    for d in ("proc", "sys", "dev", "tmp", "etc", "root"):
        (root / d).mkdir(exist_ok=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return root


def process(*args: str, terminal: bool = False, cwd: str = "/") -> dict[str, Any]:
    return {
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": list(args),
        "env": [PATH_ENV, "TERM=xterm"],
        "cwd": cwd,
        "noNewPrivileges": True,
    }


def spec(*args: str, terminal: bool = False, memory_limit: int | None = None) -> bytes:
    linux: dict[str, Any] = {
        "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
        "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
        "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
    }
    if memory_limit is not None:
        linux["resources"] = {"memory": {"limit": memory_limit, "swap": memory_limit}}
    doc = {
        "ociVersion": "1.0.2",
        "process": process(*args, terminal=terminal),
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "spinbox",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "nodev"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
        ],
        "linux": linux,
    }
    return json.dumps(doc).encode()
