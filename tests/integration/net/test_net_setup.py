"""setup_network / teardown_network with the real CNI plugins, TAPs and tc, in private namespaces.

The "guest" is the test itself: it holds the TAP's file descriptor as QEMU would,
writes Ethernet frames into it (each behind a virtio_net_hdr) and reads the
answers, so an ARP reply and an ICMP echo reply from the bridge or the veth peer
show the redirection works both ways.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import select
import struct
import subprocess
import time
from pathlib import Path

import pytest

from spinbox import net
from spinbox.net import NetConfig, NetworkError, VmNetwork, netns

VNET_HDR = bytes(10)  # struct virtio_net_hdr: no offloads
# Only bounds a wait for something that already failed; nothing here is timed.
PATIENCE = 30.0


def setup(vm_id: str, netns_path: str | None, config: NetConfig) -> VmNetwork:
    return asyncio.run(net.setup_network(vm_id, netns_path, config))


def teardown(vm_id: str, config: NetConfig) -> None:
    asyncio.run(net.teardown_network(vm_id, config))


def ip_json(*args: str, netns_path: str | None = None) -> list[dict[str, object]]:
    prefix = ["nsenter", f"--net={netns_path}"] if netns_path else []
    out = subprocess.run([*prefix, "ip", "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []  # type: ignore[no-any-return]


def link_names(netns_path: str | None = None) -> set[str]:
    return {str(link["ifname"]) for link in ip_json("link", "show", netns_path=netns_path)}


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Guest:
    """The far end of a TAP: a MAC and an IPv4 address that speak ARP and ICMP by hand."""

    def __init__(self, network: VmNetwork) -> None:
        nic = network.nics[0]
        self.fd = nic.tap_fd
        self.mac = bytes.fromhex(nic.mac.replace(":", ""))
        address = ipaddress.ip_interface(network.guest.interfaces[0].addresses[0])
        self.ip = address.ip.packed

    def send(self, dst_mac: bytes, ethertype: int, payload: bytes) -> None:
        os.write(self.fd, VNET_HDR + dst_mac + self.mac + struct.pack("!H", ethertype) + payload)

    def receive(self, accept: object) -> bytes:
        """The first frame addressed to us that `accept(frame)` takes."""
        deadline = time.monotonic() + PATIENCE
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                break
            frame = os.read(self.fd, 65536)[len(VNET_HDR) :]
            if frame[:6] == self.mac and accept(frame):  # type: ignore[operator]
                return frame
        raise AssertionError("no answer came back through the TAP")

    def arp(self, target: str) -> bytes:
        """Resolve `target` with an ARP request; returns its MAC."""
        target_ip = ipaddress.ip_address(target).packed
        request = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, self.mac, self.ip, bytes(6), target_ip)
        self.send(b"\xff" * 6, 0x0806, request)

        def is_reply(frame: bytes) -> bool:
            return frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02" and frame[28:32] == target_ip

        return self.receive(is_reply)[22:28]

    def ping(self, target: str) -> None:
        """An ICMP echo request to `target`, answered by an echo reply."""
        mac = self.arp(target)
        target_ip = ipaddress.ip_address(target).packed
        icmp = struct.pack("!BBHHH", 8, 0, 0, 0x5B0, 1) + b"spinbox"
        icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, self.ip, target_ip)
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        self.send(mac, 0x0800, header + icmp)

        def is_echo_reply(frame: bytes) -> bool:
            ip = frame[14:]
            return frame[12:14] == b"\x08\x00" and ip[9] == 1 and ip[12:16] == target_ip and ip[20] == 0

        self.receive(is_echo_reply)


def leftovers(config: NetConfig) -> list[str]:
    """Whatever spinbox state, namespace or lease exists under the run directory."""
    found = []
    for directory in (config.state_dir, config.netns_dir):
        if directory.is_dir():
            found += [str(p) for p in directory.iterdir()]
    leases = config.lease_dir / "spinbox"
    if leases.is_dir():
        found += [
            str(p) for p in leases.iterdir() if p.name not in ("lock",) and not p.name.startswith("last_")
        ]
    return found


def cni_rules() -> list[str]:
    rules = []
    for table in ("nat", "filter"):
        out = subprocess.run(
            ["iptables", "-t", table, "-S"], check=True, capture_output=True, text=True
        ).stdout
        rules += [line for line in out.splitlines() if "spinbox" in line and "-A" in line and "id:" in line]
    return rules


def test_default_network_reaches_the_bridge(net_config: NetConfig) -> None:
    network = setup("vm-default", None, net_config)
    try:
        assert len(network.nics) == 1
        [iface] = network.guest.interfaces
        assert iface.name == "eth0" and iface.mtu == 1500
        assert ipaddress.ip_interface(iface.addresses[0]) in ipaddress.ip_network("10.77.0.0/16")
        assert [(r.destination, r.gateway) for r in network.guest.routes] == [("0.0.0.0/0", "10.77.0.1")]
        # The guest NIC takes the veth's MAC; the TAP and the filters sit beside it.
        assert network.netns == str(net_config.netns_dir / "spinbox-vm-default")
        links = {str(link["ifname"]): link for link in ip_json("link", "show", netns_path=network.netns)}
        assert links["eth0"]["address"] == network.nics[0].mac
        assert "sbx-tap0" in links
        for dev, target in (("eth0", "sbx-tap0"), ("sbx-tap0", "eth0")):
            filters = subprocess.run(
                ["nsenter", f"--net={network.netns}", "tc", "filter", "show", "dev", dev, "ingress"],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            assert f"Egress Redirect to device {target}" in filters
        assert "spinbox0" in link_names()
        Guest(network).ping("10.77.0.1")
    finally:
        network.close()
        teardown("vm-default", net_config)
    assert leftovers(net_config) == []
    assert link_names() == {"lo", "spinbox0"}
    assert cni_rules() == []
    teardown("vm-default", net_config)  # twice is fine


def make_container_netns(path: Path, name: str, subnet: str = "10.78.5") -> None:
    """What a CRI runtime leaves: a namespace with eth0 (a veth) addressed, routed, peer on the host."""
    netns.create(path)
    subprocess.run(
        ["ip", "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", str(path)], check=True
    )
    subprocess.run(["ip", "addr", "add", f"{subnet}.1/24", "dev", name], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    inside = ["nsenter", f"--net={path}", "ip"]
    subprocess.run([*inside, "addr", "add", f"{subnet}.2/24", "dev", "eth0"], check=True)
    subprocess.run([*inside, "link", "set", "eth0", "mtu", "1400", "up"], check=True)
    subprocess.run([*inside, "route", "add", "default", "via", f"{subnet}.1"], check=True)
    subprocess.run([*inside, "addr", "add", "fd78:5::2/64", "dev", "eth0", "nodad"], check=True)
    subprocess.run([*inside, "-6", "route", "add", "default", "via", "fd78:5::1"], check=True)


def test_existing_interfaces_are_redirected(net_config: NetConfig, tmp_path: Path) -> None:
    ctr = tmp_path / "cri-netns"
    make_container_netns(ctr, "veth-host")
    try:
        mac = ip_json("link", "show", "eth0", netns_path=str(ctr))[0]["address"]
        network = setup("vm-cri", str(ctr), net_config)
        try:
            [iface] = network.guest.interfaces
            assert (iface.name, iface.mac, iface.mtu) == ("eth0", mac, 1400)
            # IPv6 link-local addresses are left out: the guest makes its own from the same MAC.
            assert sorted(iface.addresses) == ["10.78.5.2/24", "fd78:5::2/64"]
            assert sorted((r.destination, r.gateway, r.device) for r in network.guest.routes) == [
                ("0.0.0.0/0", "10.78.5.1", "eth0"),
                ("::/0", "fd78:5::1", "eth0"),
            ]
            assert network.nics[0].mac == mac
            assert network.netns == str(ctr)
            Guest(network).ping("10.78.5.1")
        finally:
            network.close()
            teardown("vm-cri", net_config)
        # The namespace is the runtime's: it stays, as it was.
        assert link_names(str(ctr)) == {"lo", "eth0"}
        qdiscs = subprocess.run(
            ["nsenter", f"--net={ctr}", "tc", "qdisc", "show", "dev", "eth0", "ingress"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        assert qdiscs.strip() == ""
        assert leftovers(net_config) == []

    finally:
        netns.remove(ctr)


def test_prepared_namespace_configured_by_a_hook(net_config: NetConfig) -> None:
    path, pid = asyncio.run(net.prepare_netns("vm-hook", net_config))
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(path).st_ino
    # What nerdctl's createRuntime hook does, through the pid: a veth into the namespace.
    veth = ["ip", "link", "add", "veth-hook", "type", "veth", "peer", "name", "eth0", "netns", str(pid)]
    subprocess.run(veth, check=True)
    subprocess.run(["ip", "addr", "add", "10.78.6.1/24", "dev", "veth-hook"], check=True)
    subprocess.run(["ip", "link", "set", "veth-hook", "up"], check=True)
    subprocess.run(
        ["nsenter", f"--net={path}", "ip", "addr", "add", "10.78.6.2/24", "dev", "eth0"], check=True
    )
    subprocess.run(["nsenter", f"--net={path}", "ip", "link", "set", "eth0", "up"], check=True)
    network = setup("vm-hook", path, net_config)
    try:
        assert list(network.guest.interfaces[0].addresses) == ["10.78.6.2/24"]
        Guest(network).ping("10.78.6.1")
    finally:
        network.close()
        teardown("vm-hook", net_config)
    assert not os.path.exists(path)
    assert leftovers(net_config) == []
    wait_gone(pid)
    assert "veth-hook" not in wait_links_gone({"veth-hook"})


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + PATIENCE
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the namespace holder outlived the teardown"


def wait_links_gone(names: set[str]) -> set[str]:
    """The host's links, once `names` are gone (a namespace is destroyed asynchronously)."""
    deadline = time.monotonic() + PATIENCE
    while (links := link_names()) & names and time.monotonic() < deadline:
        time.sleep(0.05)
    return links


def test_twenty_cycles_leave_nothing(net_config: NetConfig) -> None:
    for _ in range(20):
        network = setup("vm-cycle", None, net_config)
        network.close()
        teardown("vm-cycle", net_config)
    assert leftovers(net_config) == []
    assert link_names() == {"lo", "spinbox0"}
    assert cni_rules() == []


def test_bad_conflists_are_named_and_leave_nothing(net_config: NetConfig, tmp_path: Path) -> None:
    missing = tmp_path / "missing-plugin.conflist"
    data = json.loads(net_config.conflist.read_text())
    data["plugins"].append({"type": "no-such-plugin"})
    missing.write_text(json.dumps(data))
    invalid = tmp_path / "invalid.conflist"
    invalid.write_text('{"name": "spinbox", "cniVersion": "1.0.0", "plugins": [{"bridge": "x"}]}')
    failing = tmp_path / "failing.conflist"  # valid, but the bridge plugin refuses it
    data = json.loads(net_config.conflist.read_text())
    data["plugins"][0]["ipam"]["ranges"] = [[{"subnet": "10.79.0.0/16", "gateway": "10.80.0.1"}]]
    failing.write_text(json.dumps(data))

    for conflist, named in (
        (missing, '"no-such-plugin"'),
        (invalid, str(invalid)),
        (failing, '"bridge"'),
    ):
        config = NetConfig(conflist=conflist, run_dir=net_config.run_dir)
        with pytest.raises(NetworkError, match=named):
            setup("vm-bad", None, config)
        assert leftovers(config) == []
        assert link_names() <= {"lo", "spinbox0"}
        assert cni_rules() == []
    # A namespace prepared for the VM is given back too.
    asyncio.run(net.prepare_netns("vm-bad", net_config))
    with pytest.raises(NetworkError, match='"no-such-plugin"'):
        setup("vm-bad", None, NetConfig(conflist=missing, run_dir=net_config.run_dir))
    assert leftovers(net_config) == []


def test_collect_leftovers_after_a_crash(net_config: NetConfig) -> None:
    crashed = setup("vm-crashed", None, net_config)
    lost = setup("vm-lost", None, net_config)
    live = setup("vm-live", None, net_config)
    for network in (crashed, lost, live):
        network.close()
    # A crash that lost a state file still leaves a namespace and a lease to find.
    (net_config.state_dir / "vm-lost.json").unlink()
    collected = asyncio.run(net.collect_leftovers(["vm-live"], net_config))
    assert "network of VM vm-crashed" in collected
    assert f"namespace {net_config.netns_dir / 'spinbox-vm-lost'}" in collected
    assert any(item.startswith("lease ") and item.endswith(" of vm-lost") for item in collected)
    assert sorted(os.listdir(net_config.netns_dir)) == ["spinbox-vm-live"]
    assert sorted(os.listdir(net_config.state_dir)) == ["vm-live.json"]
    teardown("vm-live", net_config)
    assert leftovers(net_config) == []
    assert wait_links_gone(link_names() - {"lo", "spinbox0"}) == {"lo", "spinbox0"}
    assert cni_rules() == []
    assert asyncio.run(net.collect_leftovers([], net_config)) == []


def test_teardown_after_the_namespace_went_removes_the_masquerade_rules(net_config: NetConfig) -> None:
    network = setup("vm-nsgone", None, net_config)
    network.close()
    assert cni_rules() != []
    # The namespace is gone before the teardown (a crash in between): the
    # bridge plugin's DEL cannot see the addresses it masqueraded.
    netns.remove(Path(network.netns))
    teardown("vm-nsgone", net_config)
    assert cni_rules() == []
    assert leftovers(net_config) == []


def test_networking_off(tmp_path: Path) -> None:
    network = setup("vm-off", None, NetConfig(enabled=False, run_dir=tmp_path))
    assert network.nics == [] and len(network.guest.interfaces) == 0
    assert not (tmp_path / "net").exists()


def test_a_path_that_is_no_namespace_is_refused(net_config: NetConfig, tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("")
    for path, message in (
        (tmp_path / "absent", "does not exist"),
        (tmp_path / "plain-file", "not a network"),
    ):
        with pytest.raises(NetworkError, match=message):
            setup("vm-x", str(path), net_config)
        assert leftovers(net_config) == []


def test_prepared_namespace_left_empty_gets_the_default_network(net_config: NetConfig) -> None:
    path, _ = asyncio.run(net.prepare_netns("vm-plain", net_config))
    network = setup("vm-plain", path, net_config)
    try:
        assert network.netns == path
        assert network.guest.routes[0].gateway == "10.77.0.1"
        Guest(network).ping("10.77.0.1")
    finally:
        network.close()
        teardown("vm-plain", net_config)
    assert not os.path.exists(path)
    assert leftovers(net_config) == []
    assert link_names() == {"lo", "spinbox0"}
    assert cni_rules() == []
