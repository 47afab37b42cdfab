"""CNI network lists (.conflist): loaded, validated and adapted once.

A conflist is `{"cniVersion", "name", "plugins": [{"type", ...}, ...]}`; every
plugin named by a "type" (and every IPAM plugin named by "ipam.type") must be
an executable in the plugin path, so that a missing plugin is reported before
anything is created.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinbox import cniplugins
from spinbox.net.config import NetConfig
from spinbox.net.errors import NetworkError

# CNI network names: letters, digits and . _ - (the spec's regular expression).
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
_PLUGIN_TYPE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")


@dataclass(frozen=True)
class ConfList:
    """A validated network list; `source` is the file it came from."""

    source: Path
    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]

    def plugin_types(self) -> list[str]:
        """Every plugin binary the list needs, in order (IPAM plugins included)."""
        return cniplugins.plugin_types(self.plugins)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "cniVersion": self.cni_version,
            "name": self.name,
            "plugins": [copy.deepcopy(p) for p in self.plugins],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConfList:
        """The inverse of to_json (from a state file written by spinbox)."""
        return parse(data, Path(data.get("source", "<state>")))


def find_conflist(path: Path) -> Path:
    """The conflist file named by `path`: the file itself, or a directory's first *.conflist."""
    try:
        return cniplugins.find_conflist(path)
    except FileNotFoundError as error:
        raise NetworkError(str(error)) from None


def parse(data: object, source: Path) -> ConfList:
    """Validate decoded JSON as a network list; errors name `source`."""

    def bad(problem: str) -> NetworkError:
        return NetworkError(f"invalid CNI network list {source}: {problem}")

    if not isinstance(data, dict):
        raise bad("the top level is not a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad(f'"name" must be a network name (letters, digits, . _ -), not {name!r}')
    version = data.get("cniVersion")
    if not isinstance(version, str) or not re.match(r"^\d+\.\d+\.\d+$", version):
        raise bad(f'"cniVersion" must be a version like "1.0.0", not {version!r}')
    plugins = data.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise bad('"plugins" must be a non-empty list')
    for i, plugin in enumerate(plugins):
        if not isinstance(plugin, dict):
            raise bad(f"plugin #{i + 1} is not a JSON object")
        kind = plugin.get("type")
        if not isinstance(kind, str) or not _PLUGIN_TYPE.match(kind):
            raise bad(f'plugin #{i + 1} has no valid "type" (got {kind!r})')
        ipam = plugin.get("ipam")
        if ipam is not None:
            ipam_type = ipam.get("type") if isinstance(ipam, dict) else None
            if not isinstance(ipam_type, str) or not _PLUGIN_TYPE.match(ipam_type):
                raise bad(f'plugin "{kind}" has an "ipam" without a valid "type"')
    return ConfList(
        source=source,
        name=name,
        cni_version=version,
        plugins=tuple(copy.deepcopy(p) for p in plugins),
    )


def load(config: NetConfig) -> ConfList:
    """The network list spinboxd runs: read, validated, adapted to `config`, plugins found."""
    path = find_conflist(config.conflist)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise NetworkError(f"cannot read CNI network list {path}: {e.strerror}") from None
    except ValueError as e:
        raise NetworkError(f"invalid CNI network list {path}: not JSON ({e})") from None
    conflist = adapt(parse(data, path), config)
    for kind in conflist.plugin_types():
        find_plugin(kind, config.plugin_path, conflist.source)
    return conflist


def adapt(conflist: ConfList, config: NetConfig) -> ConfList:
    """Apply spinbox's settings: the subnet override and a host-local dataDir under run_dir.

    Keeping the leases under /run ties them to the namespaces they belong to:
    both vanish at reboot, and collect_leftovers finds them in one place.
    """
    plugins = [copy.deepcopy(p) for p in conflist.plugins]
    for plugin in plugins:
        ipam = plugin.get("ipam")
        if not isinstance(ipam, dict) or ipam.get("type") != "host-local":
            continue
        ipam.setdefault("dataDir", str(config.lease_dir))
        if config.subnet is not None:
            ipam.pop("subnet", None)
            ipam.pop("rangeStart", None)
            ipam.pop("rangeEnd", None)
            ipam.pop("gateway", None)
            ipam["ranges"] = [[{"subnet": config.subnet}]]
    return ConfList(
        source=conflist.source, name=conflist.name, cni_version=conflist.cni_version, plugins=tuple(plugins)
    )


def lease_dirs(conflist: ConfList) -> list[Path]:
    """The host-local lease directories of a network list (<dataDir>/<network name>)."""
    dirs: list[Path] = []
    for plugin in conflist.plugins:
        ipam = plugin.get("ipam")
        if isinstance(ipam, dict) and ipam.get("type") == "host-local":
            data_dir = Path(ipam.get("dataDir", "/var/lib/cni/networks"))
            dirs.append(data_dir / conflist.name)
    return dirs


def find_plugin(kind: str, plugin_path: tuple[Path, ...], source: Path) -> Path:
    for directory in plugin_path:
        candidate = directory / kind
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    where = ":".join(str(d) for d in plugin_path)
    raise NetworkError(f'CNI plugin "{kind}" (named by {source}) was not found in {where}')
