"""A VM's one state file, vm.json in its runtime directory: a JSON object with
a section per owner ("machine": spinbox.vm's QEMU process and sockets,
"daemon": spinboxd's lifecycle record).

Each owner rewrites only its own section; the file is replaced atomically, so
a reader always sees a whole file. All writers run in spinboxd's one thread.

The previous release kept two files: vm.json holding the machine's fields at
the top level, and the daemon's state.json beside it. The reader still takes
both, so an upgraded spinboxd adopts the VMs the old one started; the next
write of the daemon's section moves it into vm.json and removes state.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FILE = "vm.json"
MACHINE = "machine"
DAEMON = "daemon"
# The previous release's daemon state, beside a vm.json that held only the machine.
LEGACY_DAEMON_FILE = "state.json"


def read_sections(path: Path) -> dict[str, dict[str, Any]]:
    """Every section of the state file at `path`, the previous release's layout included.

    FileNotFoundError when neither file exists; ValueError when one is not a
    JSON object of objects.
    """
    sections: dict[str, dict[str, Any]] = {}
    try:
        data = _read_object(path)
    except FileNotFoundError:
        data = None
    if data is not None:
        if MACHINE in data or DAEMON in data:
            for name, value in data.items():
                if not isinstance(value, dict):
                    raise ValueError(f"section {name!r} of {path} is not an object")
                sections[name] = value
        elif data:
            sections[MACHINE] = data  # the previous release: the machine's fields at the top
    if DAEMON not in sections:
        try:
            sections[DAEMON] = _read_object(path.with_name(LEGACY_DAEMON_FILE))
        except FileNotFoundError:
            if data is None:
                raise
    return sections


def read_section(path: Path, name: str) -> dict[str, Any] | None:
    """One section of the state file, None if the file or the section is missing."""
    try:
        return read_sections(path).get(name)
    except FileNotFoundError:
        return None


def write_section(path: Path, name: str, value: dict[str, Any]) -> None:
    """Replace one section, keeping the others (the previous release's layout is converted)."""
    try:
        sections = read_sections(path)
    except (FileNotFoundError, ValueError):
        sections = {}
    sections[name] = value
    _replace(path, sections)


def remove_section(path: Path, name: str) -> None:
    """Drop one section; the file goes with its last section."""
    try:
        sections = read_sections(path)
    except (FileNotFoundError, ValueError):
        return
    sections.pop(name, None)
    if sections:
        _replace(path, sections)
    else:
        path.unlink(missing_ok=True)
        path.with_name(LEGACY_DAEMON_FILE).unlink(missing_ok=True)


def _read_object(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _replace(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    """Write every section to `path` at once; the previous release's daemon file is then redundant."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(sections, indent=1, sort_keys=True))
    os.replace(tmp, path)
    path.with_name(LEGACY_DAEMON_FILE).unlink(missing_ok=True)
