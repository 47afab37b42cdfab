"""guest.vminitd.network.apply in a fresh network and UTS namespace (as the guest's PID 1 would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guest.vminitd import network
from spinbox.api.proto import agent_pb2

TOP = Path(__file__).resolve().parents[3]

# Runs inside `unshare --net --uts`: makes a NIC (a veth), applies the config, reports.
INSIDE = r"""
import json, socket, subprocess, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from guest.vminitd import network
from spinbox.api.proto import agent_pb2
subprocess.run(["ip", "link", "add", "nic-a", "address", "52:54:00:12:34:56", "type", "veth",
                "peer", "name", "nic-b"], check=True)
subprocess.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other"], check=True)
subprocess.run(["ip", "link", "set", "nic-b", "up"], check=True)
config = agent_pb2.NetworkConfig.FromString(bytes.fromhex(sys.argv[2]))
network.apply(config, etc=Path(sys.argv[3]))
def ip(*args):
    return json.loads(subprocess.run(["ip", "-j", *args], check=True, capture_output=True, text=True).stdout)
print(json.dumps({
    "links": ip("link", "show"),
    "addrs": ip("addr", "show", "dev", "eth0"),
    "routes": ip("route", "show") + ip("-6", "route", "show"),
    "hostname": socket.gethostname(),
}))
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")


def run_inside(config: agent_pb2.NetworkConfig, etc: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unshare", "--net", "--uts", sys.executable, "-c", INSIDE, str(TOP),
         config.SerializeToString().hex(), str(etc)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def sample_config() -> agent_pb2.NetworkConfig:
    config = agent_pb2.NetworkConfig(
        nameservers=["10.77.0.1", "fd00::1"], search=["example.test"], dns_options=["ndots:2"],
        hostname="box1", hosts=[agent_pb2.HostEntry(address="10.77.0.9", names=["db", "db.example.test"])],
    )  # fmt: skip
    config.interfaces.add(name="eth0", mac="52:54:00:12:34:56", mtu=1400,
                          addresses=["10.77.0.5/16", "fd00:77::5/64"])  # fmt: skip
    config.routes.add(destination="169.254.1.1/32", device="eth0")
    config.routes.add(destination="0.0.0.0/0", gateway="10.77.0.1", device="eth0")
    config.routes.add(destination="::/0", gateway="fd00:77::1", device="eth0")
    return config


def test_apply_configures_nic_routes_and_files(tmp_path: Path) -> None:
    result = run_inside(sample_config(), tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    links = {link["ifname"]: link for link in report["links"]}
    # The NIC found by MAC took the name; the link that had it moved aside.
    assert links["eth0"]["address"] == "52:54:00:12:34:56"
    assert links["eth0"]["mtu"] == 1400
    assert "UP" in links["eth0"]["flags"]
    assert "nic-a" not in links
    assert "UP" in links["lo"]["flags"]
    addrs = {f"{a['local']}/{a['prefixlen']}" for a in report["addrs"][0]["addr_info"]}
    assert {"10.77.0.5/16", "fd00:77::5/64"} <= addrs
    routes = {(r["dst"], r.get("gateway", "")) for r in report["routes"]}
    assert ("default", "10.77.0.1") in routes
    assert ("default", "fd00:77::1") in routes
    assert ("169.254.1.1", "") in routes
    assert report["hostname"] == "box1"
    assert (tmp_path / "resolv.conf").read_text() == (
        "nameserver 10.77.0.1\nnameserver fd00::1\nsearch example.test\noptions ndots:2\n"
    )
    hosts = (tmp_path / "hosts").read_text().splitlines()
    assert "10.77.0.9\tdb db.example.test" in hosts
    assert "10.77.0.5\tbox1" in hosts
    assert hosts[0] == "127.0.0.1\tlocalhost"
    assert (tmp_path / "hostname").read_text() == "box1\n"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: setattr(c.interfaces[0], "mac", "nonsense"), "invalid MAC"),
        (lambda c: c.interfaces[0].addresses.append("10.1.2.3/99"), "invalid address"),
        (lambda c: setattr(c.routes[1], "device", "eth9"), "unknown interface 'eth9'"),
        (lambda c: setattr(c.routes[1], "gateway", "fd00::1"), "gateway of another family"),
        (lambda c: setattr(c, "hostname", "bad host"), "invalid hostname"),
        (lambda c: setattr(c.interfaces[0], "name", "a/b"), "invalid interface name"),
        (lambda c: c.nameservers.append("resolver"), "invalid nameserver"),
    ],
)
def test_invalid_config_is_rejected_before_any_change(mutate: object, message: str) -> None:
    config = sample_config()
    mutate(config)  # type: ignore[operator]
    with pytest.raises(network.NetworkConfigError, match=message):
        network.validate(config)


def test_unknown_mac_is_named(tmp_path: Path) -> None:
    config = sample_config()
    config.interfaces[0].mac = "52:54:00:ff:ff:ff"
    result = run_inside(config, tmp_path)
    assert result.returncode != 0
    assert "no network interface has MAC 52:54:00:ff:ff:ff" in result.stderr
    assert not (tmp_path / "resolv.conf").exists()
