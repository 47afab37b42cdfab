"""Per-VM state on disk under /run/spinbox/vm/<id>/, so a restarted spinboxd finds its VMs.

The daemon's record is the "daemon" section of the VM's vm.json
(spinbox.statefile), replaced atomically at every phase change. A VM whose phase is
"running" (or "paused") and whose QEMU still lives in its scope is re-adopted;
anything else is the remains of a crash and is cleaned up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spinbox import statefile

RUN_DIR = Path("/run/spinbox")
# Per-VM disk images (the writable layer can be large: not in /run's RAM).
STORAGE_DIR = Path("/var/lib/spinbox/vms")


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
    namespace: str = ""  # the containerd namespace of the container ("" if not told)
    netns: str = ""
    network: bool = False
    storage_dir: str = ""
    # A virtio-fs share in the runtime directory (spinbox.daemon.share).
    share: bool = False
    # A pod's further containers: container id → {"prefix": disk serial prefix,
    # "serials": [hot-plugged disks], "path": guest rootfs path}.
    added_rootfs: dict[str, dict[str, Any]] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    timeline: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0

    def save(self, directory: Path) -> None:
        statefile.write_section(directory / statefile.FILE, statefile.DAEMON, asdict(self))

    @classmethod
    def load(cls, directory: Path) -> VmState:
        """The record in `directory` (or the old state.json); OSError or ValueError if unreadable."""
        data = statefile.read_sections(directory / statefile.FILE).get(statefile.DAEMON)
        if data is None:
            raise ValueError(f"{directory / statefile.FILE} has no daemon section")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
