"""Per-VM state on disk under /run/spinbox/vm/<id>/, so a restarted spinboxd finds its VMs.

state.json is replaced atomically at every phase change. A VM whose phase is
"running" (or "paused") and whose QEMU still lives in its scope is re-adopted;
anything else is the remains of a crash and is cleaned up.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RUN_DIR = Path("/run/spinbox")
# Per-VM disk images (the writable layer can be large: not in /run's RAM).
STORAGE_DIR = Path("/var/lib/spinbox/vms")
STATE_FILE = "state.json"


def vm_dir(run_dir: Path, vm_id: str) -> Path:
    return run_dir / "vm" / vm_id


@dataclass
class VmState:
    id: str
    phase: str  # creating, running, paused, stopping
    scope: str
    pid: int = 0
    agent_address: str = ""
    control_address: str = ""
    rootfs_path: str = ""
    addresses: list[str] = field(default_factory=list)
    container_id: str = ""
    netns: str = ""
    network: bool = False
    storage_dir: str = ""
    # A pod's further containers: container id → {"prefix": disk serial prefix,
    # "serials": [hot-plugged disks], "path": guest rootfs path}.
    added_rootfs: dict[str, dict[str, Any]] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    timeline: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0

    def save(self, directory: Path) -> None:
        tmp = directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        os.replace(tmp, directory / STATE_FILE)

    @classmethod
    def load(cls, directory: Path) -> VmState:
        data = json.loads((directory / STATE_FILE).read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
