"""Which CNI plugins a network list needs and where they are looked up:
shared by spinbox.net, which runs them, and spinboxctl check, which looks
for them without loading the network code."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

# spinbox's own CNI network, shipped in spinbox/net/.
DEFAULT_CONFLIST = Path(__file__).parent / "net" / "spinbox.conflist"
# Debian's containernetworking-plugins first, then the upstream location.
DEFAULT_PLUGIN_PATH = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))


def find_conflist(path: Path) -> Path:
    """The conflist file named by `path`: the file itself, or a directory's first
    *.conflist. FileNotFoundError with a sentence when there is none."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".conflist" and p.is_file())
        if not files:
            raise FileNotFoundError(f"CNI configuration directory {path} has no *.conflist file")
        return files[0]
    if not path.exists():
        raise FileNotFoundError(f"CNI network list {path} does not exist")
    return path


def plugin_types(plugins: Iterable[dict[str, Any]]) -> list[str]:
    """Every plugin binary a list's plugins need, in order (IPAM plugins included)."""
    types: list[str] = []
    for plugin in plugins:
        types.append(plugin["type"])
        ipam = plugin.get("ipam")
        if isinstance(ipam, dict) and "type" in ipam:
            types.append(ipam["type"])
    return types
