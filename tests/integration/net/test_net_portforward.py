"""open_port_forward with the real iptables in a CRI-style namespace: the listener,
the one redirect rule, its replacement, its removal by teardown (also by a later
spinboxd reading the state file), and a failed or overdue rule that leaves nothing."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from spinbox import net
from spinbox.net import NetConfig, NetworkError, netns, portforward
from spinbox.net.portforward import RULE_COMMENT
from spinbox.net.state import StateStore
from spinbox.shim.portforward import SO_ORIGINAL_DST, original_port
from tests.integration.net.test_net_setup import make_container_netns, setup, teardown


def rules(path: Path) -> list[str]:
    out = subprocess.run(
        ["nsenter", f"--net={path}", "iptables-save", "-t", "nat"], check=True, capture_output=True, text=True
    ).stdout
    return [line for line in out.splitlines() if RULE_COMMENT in line]


def dial(path: Path, port: int) -> None:
    """A client inside the namespace connecting to 127.0.0.1:`port`, as containerd's PortForward does."""
    subprocess.Popen(
        ["nsenter", f"--net={path}", "python3", "-c",
         f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=10).recv(1)"],
    )  # fmt: skip


@pytest.fixture
def cri_vm(net_config: NetConfig, tmp_path: Path) -> Iterator[tuple[Path, NetConfig]]:
    ctr = tmp_path / "cri-netns"
    make_container_netns(ctr, "veth-pf")
    # The CRI's loopback plugin brings lo up.
    subprocess.run(["nsenter", f"--net={ctr}", "ip", "link", "set", "lo", "up"], check=True)
    network = setup("vm-pf", str(ctr), net_config)
    network.close()
    yield ctr, net_config
    try:
        teardown("vm-pf", net_config)
    finally:
        netns.remove(ctr)


def test_the_listener_gets_the_namespaces_localhost_connections_and_teardown_removes_the_rule(
    cri_vm: tuple[Path, NetConfig],
) -> None:
    ctr, config = cri_vm
    sock = asyncio.run(net.open_port_forward("vm-pf", config))
    try:
        port = sock.getsockname()[1]
        assert [r.split("--to-ports ")[1] for r in rules(ctr)] == [str(port)]
        assert StateStore(config.state_dir).load("vm-pf").forward_port == port  # type: ignore[union-attr]
        dial(ctr, 8080)
        sock.settimeout(30)
        conn, _ = sock.accept()
        with conn:
            assert original_port(conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)) == 8080
        # A second open replaces the rule: never two.
        again = asyncio.run(net.open_port_forward("vm-pf", config))
        with again:
            assert [r.split("--to-ports ")[1] for r in rules(ctr)] == [str(again.getsockname()[1])]
    finally:
        sock.close()
    # A later spinboxd knows the rule from the state file alone.
    teardown("vm-pf", config)
    assert rules(ctr) == []
    assert StateStore(config.state_dir).load("vm-pf") is None


def test_a_rule_that_cannot_be_added_leaves_no_listener_and_no_rule(
    cri_vm: tuple[Path, NetConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctr, config = cri_vm
    ports: list[int] = []
    real_run = portforward.run_iptables

    async def failing(argv: Sequence[str], timeout: float = 30.0) -> tuple[int, str]:  # noqa: ASYNC109
        if "-A" in argv:
            ports.append(int(argv[-1]))
            return 4, "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id"
        return await real_run(argv, timeout)

    monkeypatch.setattr(portforward, "run_iptables", failing)
    with pytest.raises(
        NetworkError, match=f"cannot add the port-forward rule to the network namespace {ctr}"
    ):
        asyncio.run(net.open_port_forward("vm-pf", config))
    assert rules(ctr) == []
    assert StateStore(config.state_dir).load("vm-pf").forward_port == 0  # type: ignore[union-attr]
    listening = subprocess.run(
        ["nsenter", f"--net={ctr}", "ss", "-Hltn", f"sport = :{ports[0]}"], capture_output=True, text=True
    ).stdout
    assert listening.strip() == ""


def test_an_iptables_that_hangs_is_killed_at_its_deadline_by_name() -> None:
    status, output = asyncio.run(portforward.run_iptables(["sleep", "60"], timeout=0.3))
    assert (status, output) == (-1, "iptables did not finish within 0.3 s")


def test_a_vm_without_a_network_has_nothing_to_forward(net_config: NetConfig) -> None:
    with pytest.raises(NetworkError, match="VM vm-none has no network namespace to forward ports from"):
        asyncio.run(net.open_port_forward("vm-none", net_config))
