"""The [network] table of spinbox.toml, parsed and validated once."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from spinbox.cniplugins import DEFAULT_CONFLIST, DEFAULT_PLUGIN_PATH
from spinbox.net.errors import NetworkError

DEFAULT_RUN_DIR = Path("/run/spinbox")


@dataclass(frozen=True)
class NetConfig:
    """How spinbox gives its VMs a network.

    enabled: False ("off") gives VMs no NIC at all.
    conflist: the CNI network list run for VMs whose namespace has no interface:
        a .conflist file, or a directory whose first *.conflist (by name) is used.
    plugin_path: where the CNI plugin binaries are looked up (CNI_PATH).
    subnet: replaces the host-local IPAM subnet of the conflist when set.
    run_dir: runtime state: <run_dir>/net/<id>.json, <run_dir>/netns/spinbox-<id>
        and the host-local leases (<run_dir>/cni/<network>/) unless the conflist
        names its own dataDir.
    """

    enabled: bool = True
    conflist: Path = DEFAULT_CONFLIST
    plugin_path: tuple[Path, ...] = DEFAULT_PLUGIN_PATH
    subnet: str | None = None
    run_dir: Path = DEFAULT_RUN_DIR

    def __post_init__(self) -> None:
        if self.subnet is not None:
            try:
                ipaddress.ip_network(self.subnet, strict=True)
            except ValueError as e:
                raise NetworkError(f"network subnet {self.subnet!r} is not a valid network: {e}") from None
        if not self.plugin_path:
            raise NetworkError("network plugin path is empty: name at least one CNI plugin directory")

    @property
    def state_dir(self) -> Path:
        return self.run_dir / "net"

    @property
    def netns_dir(self) -> Path:
        return self.run_dir / "netns"

    @property
    def lease_dir(self) -> Path:
        return self.run_dir / "cni"

    @classmethod
    def from_table(cls, table: Mapping[str, object]) -> NetConfig:
        """Build from spinbox.toml's [network] table; every key is optional.

        enabled = true | false | "off"; conflist = "<file or dir>";
        plugin_path = "<dir>" | ["<dir>", ...]; subnet = "10.77.0.0/16" ("" for the conflist's);
        run_dir = "<dir>". Keys may be written with "-" as well as "_" (plugin-path).
        """
        values = {key.replace("-", "_"): value for key, value in table.items()}
        if len(values) != len(table):
            raise NetworkError("[network] names a key twice (once with '-', once with '_')")
        known = {"enabled", "conflist", "plugin_path", "subnet", "run_dir"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise NetworkError(f"unknown key(s) in [network]: {', '.join(unknown)}")
        kwargs: dict[str, object] = {}
        if "enabled" in values:
            enabled = values["enabled"]
            if enabled == "off":
                enabled = False
            if not isinstance(enabled, bool):
                raise NetworkError(f'[network] enabled must be true, false or "off", not {enabled!r}')
            kwargs["enabled"] = enabled
        if "conflist" in values:
            kwargs["conflist"] = Path(_string(values, "conflist"))
        if "plugin_path" in values:
            value = values["plugin_path"]
            dirs = [value] if isinstance(value, str) else value
            if not isinstance(dirs, list) or not all(isinstance(d, str) and d for d in dirs):
                raise NetworkError("[network] plugin_path must be a directory or a list of directories")
            kwargs["plugin_path"] = tuple(Path(d) for d in dirs)
        if values.get("subnet") != "" and "subnet" in values:
            kwargs["subnet"] = _string(values, "subnet")
        if "run_dir" in values:
            kwargs["run_dir"] = Path(_string(values, "run_dir"))
        return cls(**kwargs)  # type: ignore[arg-type]


def _string(table: Mapping[str, object], key: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not value:
        raise NetworkError(f"[network] {key} must be a non-empty string, not {value!r}")
    return value
