"""/etc/spinbox/spinbox.toml as the package installs it (packaging/spinbox.toml)
names every key of spinbox.config, each once. That the values shown are the
defaults is tests/unit/daemon/test_daemon_config.py's to check."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from spinbox.config import Config, DaemonConfig, StorageConfig, TimeoutsConfig, VmConfig, parse
from spinbox.net.config import NetConfig

FILE = Path(__file__).resolve().parents[3] / "packaging" / "spinbox.toml"
# A commented-out setting: `#key = value`, no space after the `#` (prose has one).
SETTING = re.compile(r"^#([A-Za-z_-]+) = .*$")
SECTIONS = {
    "vm": VmConfig,
    "storage": StorageConfig,
    "daemon": DaemonConfig,
    "network": NetConfig,
    "timeouts": TimeoutsConfig,
}
# Keys whose default is a path inside spinbox's modules, described in prose.
PROSE = {("network", "conflist")}


def documented_keys() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    section = ""
    for line in FILE.read_text().splitlines():
        if header := re.match(r"^\[(\w+)\]$", line):
            section = header[1]
            keys.setdefault(section, [])
        elif setting := SETTING.match(line):
            keys[section].append(setting[1])
        elif (section, line.removeprefix("# ").split(":")[0]) in PROSE:
            keys[section].append(line.removeprefix("# ").split(":")[0])
    return keys


def test_the_installed_file_changes_nothing() -> None:
    assert parse(FILE.read_text(), str(FILE)) == Config()


def test_every_key_is_documented_once() -> None:
    keys = documented_keys()
    assert set(keys) == set(SECTIONS)
    for name, cls in SECTIONS.items():
        expected = [f.name for f in dataclasses.fields(cls)]
        assert sorted(keys[name]) == sorted(expected), f"[{name}]"
