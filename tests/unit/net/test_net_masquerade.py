"""The bridge plugin's masquerade chain and comment, as Debian's plugin
(containernetworking-plugins 1.1.1) writes them, and the commands that remove
them when the plugin's DEL cannot (its namespace gone)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from spinbox.net import masquerade
from spinbox.net.masquerade import chain_name, comment, masquerade_rules, remove_masquerade

# Written by the bridge plugin's ADD for network "spinbox", container "default-soak0x1".
PLUGIN_CHAIN = "CNI-2ebc81bbded19391e0c1377a"
CONFLIST = {
    "name": "spinbox",
    "plugins": [{"type": "bridge", "ipMasq": True}, {"type": "portmap"}, {"type": "firewall"}],
}
RESULT = {"ips": [{"address": "10.77.0.2/16"}, {"address": "fd00::2/64"}]}


def test_chain_and_comment_are_the_plugins() -> None:
    assert chain_name("spinbox", "default-soak0x1") == PLUGIN_CHAIN
    assert comment("spinbox", "default-soak0x1") == 'name: "spinbox" id: "default-soak0x1"'


def test_rules_only_where_a_bridge_masquerades() -> None:
    rules = masquerade_rules(CONFLIST, "default-soak0x1", RESULT)
    assert [(r.address, r.chain, r.ipv6) for r in rules] == [
        ("10.77.0.2/16", PLUGIN_CHAIN, False),
        ("fd00::2/64", PLUGIN_CHAIN, True),
    ]
    no_masq = {"name": "spinbox", "plugins": [{"type": "bridge"}]}
    assert masquerade_rules(no_masq, "default-soak0x1", RESULT) == []


def test_removal_runs_the_plugins_teardown_and_tolerates_what_is_gone() -> None:
    ran: list[list[str]] = []

    async def run(argv: Sequence[str]) -> tuple[int, str]:
        ran.append(list(argv))
        if argv[4] == "-D" and "/" in argv[7]:
            return 1, "iptables: Bad rule (does a matching rule exist in that chain?)."
        return 0, ""

    rules = masquerade_rules(CONFLIST, "default-soak0x1", {"ips": [{"address": "10.77.0.2/16"}]})
    assert asyncio.run(remove_masquerade(rules, run)) == []
    jump = ["-j", PLUGIN_CHAIN, "-m", "comment", "--comment", 'name: "spinbox" id: "default-soak0x1"']
    assert ran == [
        ["iptables", "-w", "-t", "nat", "-D", "POSTROUTING", "-s", "10.77.0.2", *jump],
        ["iptables", "-w", "-t", "nat", "-D", "POSTROUTING", "-s", "10.77.0.2/16", *jump],
        ["iptables", "-w", "-t", "nat", "-F", PLUGIN_CHAIN],
        ["iptables", "-w", "-t", "nat", "-X", PLUGIN_CHAIN],
    ]


def test_a_removal_that_fails_is_a_sentence() -> None:
    async def run(argv: Sequence[str]) -> tuple[int, str]:
        return 4, "iptables: Permission denied (you must be root)."

    rules = masquerade_rules(CONFLIST, "vm1", {"ips": [{"address": "10.77.0.9/16"}]})
    problems = asyncio.run(remove_masquerade(rules, run))
    assert len(problems) == 4 and problems[0].endswith("Permission denied (you must be root).")


def test_a_tool_that_never_finishes_is_killed_at_its_deadline_and_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(masquerade, "IPTABLES_TIMEOUT", 0.3)
    status, output = asyncio.run(masquerade.run_tool(["sleep", "600"]))
    assert (status, output) == (-1, "sleep did not finish within 0.3s")
