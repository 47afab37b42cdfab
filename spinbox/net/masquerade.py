"""The bridge plugin's masquerade rules, removed by spinbox when the plugin cannot.

The bridge plugin's DEL removes the rules of `"ipMasq": true` only from the
addresses it finds on the interface inside the namespace: with the namespace
gone (a crash, a teardown retried later) it releases the address and leaves
the POSTROUTING rule and the per-container chain in the host's iptables. The
ADD result spinbox saved names the addresses, and the chain and comment are
the plugin's own (containernetworking/plugins pkg/utils: the chain is "CNI-"
and the hex SHA-512 of network name + container id, cut to 28 characters).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

MAX_CHAIN = 28
IPTABLES_TIMEOUT = 30.0
# What iptables says about a rule or chain that is not there (any more).
GONE = ("does not exist", "No chain/target/match", "Bad rule", "Couldn't load target")


def chain_name(network: str, container_id: str) -> str:
    return f"CNI-{hashlib.sha512((network + container_id).encode()).hexdigest()}"[:MAX_CHAIN]


def comment(network: str, container_id: str) -> str:
    # Go's %q of plain names: JSON's quoting.
    return f"name: {json.dumps(network)} id: {json.dumps(container_id)}"


@dataclass(frozen=True)
class MasqueradeRule:
    address: str  # CIDR, as the ADD result gives it
    chain: str
    comment: str

    @property
    def ipv6(self) -> bool:
        return ipaddress.ip_interface(self.address).version == 6

    def commands(self) -> list[list[str]]:
        """What the plugin's TeardownIPMasq runs: the jump from POSTROUTING (by
        address, and by CIDR as older versions wrote it), then the chain."""
        tool = "ip6tables" if self.ipv6 else "iptables"
        address = str(ipaddress.ip_interface(self.address).ip)
        jump = ["-j", self.chain, "-m", "comment", "--comment", self.comment]
        return [
            [tool, "-w", "-t", "nat", "-D", "POSTROUTING", "-s", address, *jump],
            [tool, "-w", "-t", "nat", "-D", "POSTROUTING", "-s", self.address, *jump],
            [tool, "-w", "-t", "nat", "-F", self.chain],
            [tool, "-w", "-t", "nat", "-X", self.chain],
        ]


def masquerade_rules(
    conflist: dict[str, Any], container_id: str, result: dict[str, Any]
) -> list[MasqueradeRule]:
    """The rules the list's bridge plugins with ipMasq made for the result's addresses."""
    network = str(conflist.get("name", ""))
    masquerading = any(
        isinstance(p, dict) and p.get("type") == "bridge" and p.get("ipMasq") is True
        for p in conflist.get("plugins") or []
    )
    if not masquerading:
        return []
    rules = []
    for ip in result.get("ips") or []:
        address = ip.get("address") if isinstance(ip, dict) else None
        if isinstance(address, str):
            rules.append(
                MasqueradeRule(address, chain_name(network, container_id), comment(network, container_id))
            )
    return rules


Runner = Callable[[Sequence[str]], Awaitable[tuple[int, str]]]


async def run_tool(argv: Sequence[str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(IPTABLES_TIMEOUT):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        return -1, f"{argv[0]} did not finish within {IPTABLES_TIMEOUT:g}s"
    return process.returncode or 0, output.decode(errors="replace").strip()


async def remove_masquerade(rules: Sequence[MasqueradeRule], run: Runner = run_tool) -> list[str]:
    """Remove the rules (those already gone are fine); returns the problems, as sentences."""
    problems = []
    for rule in rules:
        for argv in rule.commands():
            status, output = await run(argv)
            gone = any(marker in output for marker in GONE)
            if status != 0 and not gone:
                problems.append(f"{' '.join(argv)}: {output or f'exit status {status}'}")
    return problems
