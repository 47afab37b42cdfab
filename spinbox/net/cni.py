"""Running a CNI network list, as the CNI specification describes.

Each plugin is an executable run with CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS,
CNI_IFNAME and CNI_PATH in its environment and its configuration on stdin: the
plugin's own object plus the list's "name" and "cniVersion", and for a chain the
previous plugin's result as "prevResult". ADD runs the plugins in order, DEL in
reverse order (with the ADD result as prevResult), CHECK in order.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinbox.net.conflist import ConfList, find_plugin
from spinbox.net.errors import NetworkError

# A plugin that has not answered in this long is stuck (they take milliseconds).
PLUGIN_TIMEOUT = 120.0


@dataclass(frozen=True)
class Dns:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class IpConfig:
    address: str  # CIDR, e.g. 10.77.0.5/16
    gateway: str = ""
    interface: int | None = None  # index into CniResult.interfaces


@dataclass(frozen=True)
class CniResult:
    """The parts of a CNI result spinbox uses (spec 0.3.0 to 1.0.0 shapes)."""

    cni_version: str
    interfaces: tuple[dict[str, str], ...] = ()
    ips: tuple[IpConfig, ...] = ()
    routes: tuple[tuple[str, str], ...] = ()  # (dst, gw)
    dns: Dns = field(default_factory=Dns)
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


def parse_result(data: object) -> CniResult:
    """Check and decode a plugin's result; raises NetworkError naming what is wrong."""
    if not isinstance(data, dict):
        raise NetworkError("CNI result is not a JSON object")
    version = data.get("cniVersion", "")
    if not isinstance(version, str):
        raise NetworkError("CNI result has no valid cniVersion")
    interfaces: list[dict[str, str]] = []
    for item in data.get("interfaces") or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise NetworkError(f"CNI result has an invalid interface: {item!r}")
        interfaces.append({k: str(v) for k, v in item.items() if isinstance(v, str)})
    ips: list[IpConfig] = []
    for item in data.get("ips") or []:
        if not isinstance(item, dict):
            raise NetworkError(f"CNI result has an invalid ips entry: {item!r}")
        address = item.get("address")
        try:
            ipaddress.ip_interface(address)  # type: ignore[arg-type]
        except ValueError:
            raise NetworkError(f"CNI result has an invalid address: {address!r}") from None
        gateway = item.get("gateway") or ""
        if gateway:
            ipaddress.ip_address(gateway)
        index = item.get("interface")
        ips.append(
            IpConfig(address=address, gateway=gateway, interface=index if isinstance(index, int) else None)  # type: ignore[arg-type]
        )
    routes: list[tuple[str, str]] = []
    for item in data.get("routes") or []:
        if not isinstance(item, dict) or not isinstance(item.get("dst"), str):
            raise NetworkError(f"CNI result has an invalid route: {item!r}")
        routes.append((item["dst"], str(item.get("gw") or "")))
    dns_data = data.get("dns") or {}
    if not isinstance(dns_data, dict):
        raise NetworkError("CNI result has an invalid dns entry")
    dns = Dns(
        nameservers=tuple(str(s) for s in dns_data.get("nameservers") or ()),
        domain=str(dns_data.get("domain") or ""),
        search=tuple(str(s) for s in dns_data.get("search") or ()),
        options=tuple(str(s) for s in dns_data.get("options") or ()),
    )
    return CniResult(
        cni_version=version,
        interfaces=tuple(interfaces),
        ips=tuple(ips),
        routes=tuple(routes),
        dns=dns,
        raw=data,
    )


@dataclass(frozen=True)
class Attachment:
    """Where a network list is attached: the CNI runtime parameters."""

    container_id: str
    netns: str  # path; "" when the namespace is gone (DEL only)
    ifname: str = "eth0"
    args: tuple[tuple[str, str], ...] = ()
    capability_args: dict[str, Any] = field(default_factory=dict, compare=False)


async def add(conflist: ConfList, attachment: Attachment, plugin_path: tuple[Path, ...]) -> dict[str, Any]:
    """CNI ADD of the whole list; returns the final result (raw JSON)."""
    result: dict[str, Any] | None = None
    for plugin in conflist.plugins:
        result = await _run(conflist, plugin, "ADD", attachment, plugin_path, result)
        if result is None:
            raise NetworkError(f'CNI plugin "{plugin["type"]}" returned no result for ADD')
    assert result is not None
    return result


async def delete(
    conflist: ConfList, attachment: Attachment, plugin_path: tuple[Path, ...], prev: dict[str, Any] | None
) -> None:
    """CNI DEL of the whole list, in reverse order; every plugin runs even if one fails."""
    errors: list[str] = []
    for plugin in reversed(conflist.plugins):
        try:
            await _run(conflist, plugin, "DEL", attachment, plugin_path, prev)
        except NetworkError as e:
            errors.append(str(e))
    if errors:
        raise NetworkError("; ".join(errors))


async def check(
    conflist: ConfList, attachment: Attachment, plugin_path: tuple[Path, ...], prev: dict[str, Any]
) -> None:
    """CNI CHECK of the whole list (spec 0.4.0 and later)."""
    for plugin in conflist.plugins:
        await _run(conflist, plugin, "CHECK", attachment, plugin_path, prev)


def plugin_config(
    conflist: ConfList, plugin: dict[str, Any], attachment: Attachment, prev: dict[str, Any] | None
) -> dict[str, Any]:
    """The configuration one plugin gets on stdin."""
    config = copy.deepcopy(plugin)
    config["name"] = conflist.name
    config["cniVersion"] = conflist.cni_version
    capabilities = plugin.get("capabilities") or {}
    runtime = {k: v for k, v in attachment.capability_args.items() if capabilities.get(k)}
    config.pop("runtimeConfig", None)
    if runtime:
        config["runtimeConfig"] = runtime
    if prev is not None:
        config["prevResult"] = prev
    return config


async def _run(
    conflist: ConfList,
    plugin: dict[str, Any],
    command: str,
    attachment: Attachment,
    plugin_path: tuple[Path, ...],
    prev: dict[str, Any] | None,
) -> dict[str, Any] | None:
    kind = plugin["type"]
    binary = find_plugin(kind, plugin_path, conflist.source)
    stdin = json.dumps(plugin_config(conflist, plugin, attachment, prev)).encode()
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": attachment.container_id,
        "CNI_NETNS": attachment.netns,
        "CNI_IFNAME": attachment.ifname,
        "CNI_PATH": ":".join(str(d) for d in plugin_path),
    }
    if attachment.args:
        env["CNI_ARGS"] = ";".join(f"{k}={v}" for k, v in attachment.args)
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(PLUGIN_TIMEOUT):
            stdout, stderr = await proc.communicate(stdin)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise NetworkError(f'CNI plugin "{kind}" did not finish {command} in {PLUGIN_TIMEOUT:.0f}s') from None
    if proc.returncode != 0:
        raise NetworkError(f'CNI plugin "{kind}" failed {command}: {_error_message(stdout, stderr)}')
    if command != "ADD":
        return None
    try:
        result = json.loads(stdout)
    except ValueError:
        raise NetworkError(f'CNI plugin "{kind}" printed no JSON result for ADD') from None
    parse_result(result)
    return result  # type: ignore[no-any-return]


def _error_message(stdout: bytes, stderr: bytes) -> str:
    """The spec's error object ({code, msg, details}) as a sentence, else stderr."""
    try:
        error = json.loads(stdout)
    except ValueError:
        error = None
    if isinstance(error, dict) and error.get("msg"):
        details = f" ({error['details']})" if error.get("details") else ""
        return f"{error['msg']}{details}"
    text = (stderr or stdout).decode(errors="replace").strip()
    return text or "no error message"
