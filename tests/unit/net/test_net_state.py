"""State files, guest configuration and DNS settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spinbox.api.proto import agent_pb2
from spinbox.net import NetworkError, network, tap
from spinbox.net.cni import Dns, parse_result
from spinbox.net.state import CniState, NetState, StateStore, TapState, check_vm_id


def test_state_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "net")
    state = NetState(
        vm_id="vm-1",
        netns="/run/spinbox/netns/spinbox-vm-1",
        owned=True,
        holder_pid=42,
        holder_start=1234,
        cni=CniState(
            conflist={"name": "spinbox"}, plugin_path=("/usr/lib/cni",), ifname="eth0", result={"a": 1}
        ),
        taps=(TapState(link="eth0", tap="sbx-tap0"),),
    )
    store.save(state)
    assert store.load("vm-1") == state
    assert store.vm_ids() == ["vm-1"]
    assert [p.name for p in (tmp_path / "net").iterdir()] == ["vm-1.json"]
    store.remove("vm-1")
    store.remove("vm-1")
    assert store.load("vm-1") is None
    assert store.vm_ids() == []


def test_corrupt_state_is_named(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    (tmp_path / "vm.json").write_text("{")
    with pytest.raises(NetworkError, match=f"unreadable network state {tmp_path}/vm.json"):
        store.load("vm")
    (tmp_path / "vm.json").write_text("{}")
    with pytest.raises(NetworkError, match="invalid network state"):
        store.load("vm")


@pytest.mark.parametrize("vm_id", ["", "../x", "a/b", "-x", "x" * 200, "a b"])
def test_bad_vm_ids_are_refused(vm_id: str) -> None:
    with pytest.raises(NetworkError, match="invalid VM id"):
        check_vm_id(vm_id)


def test_resolv_conf_without_loopback_servers(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text(
        "# generated\nnameserver 127.0.0.53\nnameserver ::1\nnameserver 192.0.2.1 # office\n"
        "nameserver fe80::1%eth0\nsearch a.test b.test\noptions ndots:3 edns0\noptions rotate\n"
    )
    assert network.parse_resolv_conf(path) == Dns(
        nameservers=("192.0.2.1", "fe80::1%eth0"),
        search=("a.test", "b.test"),
        options=("ndots:3", "edns0", "rotate"),
    )
    assert network.parse_resolv_conf(tmp_path / "absent") == Dns()


def test_stub_resolver_falls_back_to_upstream(tmp_path: Path) -> None:
    stub = tmp_path / "resolv.conf"
    stub.write_text("nameserver 127.0.0.53\nsearch lan\n")
    upstream = tmp_path / "upstream.conf"
    upstream.write_text("nameserver 192.0.2.53\n")
    assert network.host_dns(stub, upstream).nameservers == ()
    assert network.host_dns(stub, tmp_path / "absent").search == ("lan",)


def test_guest_config_from_links_and_cni_dns() -> None:
    links = [
        tap.LinkInfo(
            name="eth0", index=2, mac="0a:58:0a:4d:00:05", mtu=1450,
            addresses=("10.77.0.5/16", "fd77::5/64"),
            routes=(tap.RouteInfo("169.254.1.1/32", ""), tap.RouteInfo("0.0.0.0/0", "169.254.1.1")),
        ),
    ]  # fmt: skip
    result = parse_result(
        {"cniVersion": "1.0.0", "dns": {"nameservers": ["10.96.0.10"], "domain": "cluster.local"}}
    )
    config = network.guest_config(links, result)
    assert [(i.name, i.mac, i.mtu, list(i.addresses)) for i in config.interfaces] == [
        ("eth0", "0a:58:0a:4d:00:05", 1450, ["10.77.0.5/16", "fd77::5/64"])
    ]
    assert [(r.destination, r.gateway, r.device) for r in config.routes] == [
        ("169.254.1.1/32", "", "eth0"),
        ("0.0.0.0/0", "169.254.1.1", "eth0"),
    ]
    assert list(config.nameservers) == ["10.96.0.10"]
    assert list(config.search) == ["cluster.local"]


def test_closing_a_network_twice_closes_each_fd_once() -> None:
    read_end, write_end = os.pipe()
    vm_network = network.VmNetwork(
        vm_id="vm",
        nics=[network.Nic(tap_fd=write_end, mac="0a:00:00:00:00:01")],
        guest=agent_pb2.NetworkConfig(),
    )
    vm_network.close()
    reused = os.dup(read_end)  # may take the number write_end had
    try:
        vm_network.close()
        os.fstat(reused)
    finally:
        os.close(reused)
        os.close(read_end)
