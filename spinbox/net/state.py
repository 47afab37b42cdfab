"""What spinbox took for a VM's network, on disk, so teardown works after a crash.

One JSON file per VM, <run_dir>/net/<id>.json, rewritten (atomically) before each
step that creates something: whatever exists is always named in the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from spinbox.net.errors import NetworkError

# containerd ids are [A-Za-z0-9._-]; CNI container ids must also start alphanumeric.
_VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_vm_id(vm_id: str) -> None:
    if not _VM_ID.match(vm_id):
        raise NetworkError(
            f"invalid VM id {vm_id!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )


@dataclass(frozen=True)
class CniState:
    conflist: dict[str, Any]  # ConfList.to_json(), as run
    plugin_path: tuple[str, ...]
    ifname: str
    result: dict[str, Any] | None = None  # the ADD result, once ADD succeeded


@dataclass(frozen=True)
class TapState:
    link: str  # the interface whose traffic goes to the TAP
    tap: str


@dataclass(frozen=True)
class NetState:
    vm_id: str
    netns: str = ""  # the namespace holding the VM's TAPs ("" before it is known)
    owned: bool = False  # spinbox created the namespace and removes it
    holder_pid: int = 0
    holder_start: int = 0
    cni: CniState | None = None
    taps: tuple[TapState, ...] = field(default_factory=tuple)
    forward_port: int = 0  # the port-forward rule's listener port in netns (0: no rule)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetState:
        cni = data.get("cni")
        return cls(
            vm_id=data["vm_id"],
            netns=data.get("netns", ""),
            owned=bool(data.get("owned", False)),
            holder_pid=int(data.get("holder_pid", 0)),
            holder_start=int(data.get("holder_start", 0)),
            cni=None
            if cni is None
            else CniState(
                conflist=cni["conflist"],
                plugin_path=tuple(cni["plugin_path"]),
                ifname=cni["ifname"],
                result=cni.get("result"),
            ),
            taps=tuple(TapState(link=t["link"], tap=t["tap"]) for t in data.get("taps", ())),
            forward_port=int(data.get("forward_port", 0)),
        )

    def evolve(self, **changes: Any) -> NetState:
        return replace(self, **changes)


class StateStore:
    """The state files of one run directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, vm_id: str) -> Path:
        return self.directory / f"{vm_id}.json"

    def load(self, vm_id: str) -> NetState | None:
        try:
            data = json.loads(self.path(vm_id).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise NetworkError(f"unreadable network state {self.path(vm_id)}: {e}") from None
        try:
            return NetState.from_json(data)
        except (KeyError, TypeError, ValueError) as e:
            raise NetworkError(f"invalid network state {self.path(vm_id)}: {e!r}") from None

    def save(self, state: NetState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(state.vm_id)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            json.dump(state.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def remove(self, vm_id: str) -> None:
        self.path(vm_id).unlink(missing_ok=True)

    def vm_ids(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.json") if not p.name.startswith("."))
