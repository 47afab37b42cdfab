"""/etc/spinbox/spinbox.toml as the package installs it (packaging/spinbox.toml)
shows every key of spinbox.config with its built-in default, commented out."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from spinbox.config import Config, DaemonConfig, StorageConfig, VmConfig, parse
from spinbox.net.config import NetConfig

FILE = Path(__file__).resolve().parents[3] / "packaging" / "spinbox.toml"
# A commented-out setting: `#key = value`, no space after the `#` (prose has one).
SETTING = re.compile(r"^#([A-Za-z_-]+ = .*)$")
SECTIONS = {"vm": VmConfig, "storage": StorageConfig, "daemon": DaemonConfig}


def uncommented() -> str:
    return "\n".join(SETTING.sub(r"\1", line) for line in FILE.read_text().splitlines())


def documented_keys() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    section = ""
    for line in FILE.read_text().splitlines():
        if header := re.match(r"^\[(\w+)\]$", line):
            section = header[1]
        elif setting := SETTING.match(line):
            keys.setdefault(section, []).append(setting[1].split(" = ")[0])
    return keys


def test_the_installed_file_changes_nothing() -> None:
    assert parse(FILE.read_text(), str(FILE)) == Config()


def test_every_key_is_documented_once() -> None:
    keys = documented_keys()
    for name, cls in SECTIONS.items():
        expected = [f.name for f in dataclasses.fields(cls)]
        assert sorted(keys.get(name, [])) == sorted(expected), f"[{name}]"
    network = [f.name for f in dataclasses.fields(NetConfig)]
    assert sorted(keys["network"]) == sorted(network)
    assert set(keys) == {*SECTIONS, "network"}


def test_uncommented_values_are_the_defaults() -> None:
    config = parse(uncommented(), "uncommented spinbox.toml")
    assert config.vm == VmConfig()
    assert config.storage == StorageConfig()
    assert config.daemon == DaemonConfig()
    network = NetConfig.from_table(config.network_table)
    default = NetConfig()
    # The conflist ships beside spinbox.net: in the package that is under
    # /usr/lib/spinbox/python, here it is in the source tree.
    tail = ("spinbox", "net", "spinbox.conflist")
    assert network.conflist.parts[-3:] == default.conflist.parts[-3:] == tail
    assert str(network.conflist).startswith("/usr/lib/spinbox/python/")
    assert dataclasses.replace(network, conflist=default.conflist) == default
