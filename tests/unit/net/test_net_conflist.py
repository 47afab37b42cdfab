"""Network lists: loading, validation, adaptation, and the CNI chaining protocol."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import pytest

from spinbox.net import DEFAULT_CONFLIST, NetConfig, NetworkError, cni, conflist


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_shipped_conflist_is_valid_and_uses_the_documented_subnet() -> None:
    networks = conflist.load(NetConfig())
    assert networks.name == "spinbox"
    assert networks.plugin_types() == ["bridge", "host-local", "firewall"]
    bridge = networks.plugins[0]
    assert bridge["bridge"] == "spinbox0"
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.77.0.0/16"}]]
    # Leases live under the run directory, not in /var/lib/cni.
    assert bridge["ipam"]["dataDir"] == "/run/spinbox/cni"
    assert conflist.lease_dirs(networks) == [Path("/run/spinbox/cni/spinbox")]


def test_subnet_override(tmp_path: Path) -> None:
    networks = conflist.load(NetConfig(subnet="10.123.0.0/24", run_dir=tmp_path))
    ipam = networks.plugins[0]["ipam"]
    assert ipam["ranges"] == [[{"subnet": "10.123.0.0/24"}]]
    assert ipam["dataDir"] == str(tmp_path / "cni")


def test_directory_picks_first_conflist(tmp_path: Path) -> None:
    data = json.loads(DEFAULT_CONFLIST.read_text())
    write(tmp_path / "20-b.conflist", {**data, "name": "second"})
    write(tmp_path / "10-a.conflist", {**data, "name": "first"})
    write(tmp_path / "00-ignored.json", "{}")
    assert conflist.load(NetConfig(conflist=tmp_path)).name == "first"


def test_empty_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(NetworkError, match=f"{tmp_path} has no \\*.conflist"):
        conflist.load(NetConfig(conflist=tmp_path))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not JSON"),
        ([], "top level is not a JSON object"),
        ({"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}, '"name" must be'),
        ({"name": "n", "cniVersion": "one", "plugins": [{"type": "bridge"}]}, '"cniVersion" must be'),
        ({"name": "n", "cniVersion": "1.0.0", "plugins": []}, '"plugins" must be a non-empty list'),
        ({"name": "n", "cniVersion": "1.0.0", "plugins": [{"kind": "x"}]}, 'plugin #1 has no valid "type"'),
        (
            {"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "../x"}]},
            'plugin #1 has no valid "type"',
        ),
        ({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "bridge", "ipam": {}}]}, '"ipam" without'),
    ],
)
def test_invalid_conflist_names_the_file(tmp_path: Path, content: object, problem: str) -> None:
    path = write(tmp_path / "bad.conflist", content)
    with pytest.raises(NetworkError) as info:
        conflist.load(NetConfig(conflist=path))
    assert str(path) in str(info.value)
    assert problem in str(info.value)


def test_missing_plugin_is_named(tmp_path: Path) -> None:
    data = json.loads(DEFAULT_CONFLIST.read_text())
    data["plugins"].append({"type": "no-such-plugin"})
    path = write(tmp_path / "x.conflist", data)
    with pytest.raises(NetworkError, match=r'CNI plugin "no-such-plugin" .* was not found in /usr/lib/cni'):
        conflist.load(NetConfig(conflist=path))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(NetworkError, match=f"{tmp_path}/absent.conflist does not exist"):
        conflist.load(NetConfig(conflist=tmp_path / "absent.conflist"))


def test_config_from_table() -> None:
    config = NetConfig.from_table(
        {
            "enabled": "off",
            "conflist": "/etc/spinbox/net.d",
            "plugin-path": ["/a", "/b"],
            "subnet": "10.5.0.0/16",
        }
    )
    assert config == NetConfig(
        enabled=False,
        conflist=Path("/etc/spinbox/net.d"),
        plugin_path=(Path("/a"), Path("/b")),
        subnet="10.5.0.0/16",
    )
    assert NetConfig.from_table({}) == NetConfig()
    assert NetConfig.from_table({"subnet": "", "plugin_path": "/a", "run_dir": "/r"}) == NetConfig(
        plugin_path=(Path("/a"),), run_dir=Path("/r")
    )
    with pytest.raises(NetworkError, match="names a key twice"):
        NetConfig.from_table({"run-dir": "/a", "run_dir": "/b"})
    with pytest.raises(NetworkError, match="unknown key\\(s\\) in \\[network\\]: bridge"):
        NetConfig.from_table({"bridge": "x"})
    with pytest.raises(NetworkError, match=re.escape("subnet '10.5.0.1/16' is not a valid network")):
        NetConfig.from_table({"subnet": "10.5.0.1/16"})
    with pytest.raises(NetworkError, match="enabled must be"):
        NetConfig.from_table({"enabled": "sometimes"})


# A stand-in plugin: records its stdin and environment, then answers like a chained plugin.
FAKE_PLUGIN = """#!/bin/sh
input=$(cat)
log="$(dirname "$0")/calls.log"
printf '%s %s %s %s %s\\n' "$(basename "$0")" "$CNI_COMMAND" "$CNI_CONTAINERID" \\
  "$CNI_IFNAME" "$CNI_NETNS" >> "$log"
printf '%s\\n' "$input" >> "$(dirname "$0")/stdin.log"
if [ "$(basename "$0")" = failing ]; then
  echo '{"cniVersion": "1.0.0", "code": 11, "msg": "no luck", "details": "for testing"}'; exit 1
fi
if [ "$CNI_COMMAND" = ADD ]; then
  echo '{"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "mac": "0a:00:00:00:00:01"}],
         "ips": [{"address": "10.9.0.2/24", "gateway": "10.9.0.1", "interface": 0}],
         "routes": [{"dst": "0.0.0.0/0"}], "dns": {"nameservers": ["10.9.0.1"], "search": ["t"]}}'
fi
"""


def fake_plugins(directory: Path, *names: str) -> tuple[Path, ...]:
    for name in names:
        path = directory / name
        path.write_text(FAKE_PLUGIN)
        path.chmod(0o755)
    return (directory,)


def test_chain_runs_add_in_order_and_del_in_reverse_with_prev_result(tmp_path: Path) -> None:
    path = fake_plugins(tmp_path, "first", "second")
    networks = conflist.parse(
        {"name": "n", "cniVersion": "1.0.0",
         "plugins": [{"type": "first", "x": 1}, {"type": "second", "capabilities": {"portMappings": True}}]},
        tmp_path / "n.conflist",
    )  # fmt: skip
    attachment = cni.Attachment(
        container_id="vm1",
        netns="/run/netns/x",
        ifname="eth0",
        capability_args={"portMappings": [1], "other": 2},
    )
    result = asyncio.run(cni.add(networks, attachment, path))
    asyncio.run(cni.delete(networks, attachment, path, result))
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == [
        "first ADD vm1 eth0 /run/netns/x",
        "second ADD vm1 eth0 /run/netns/x",
        "second DEL vm1 eth0 /run/netns/x",
        "first DEL vm1 eth0 /run/netns/x",
    ]
    stdins = [json.loads(line) for line in (tmp_path / "stdin.log").read_text().splitlines()]
    assert stdins[0] == {"type": "first", "x": 1, "name": "n", "cniVersion": "1.0.0"}
    # The second plugin gets the first one's result and only the capabilities it declares.
    assert stdins[1]["prevResult"]["ips"][0]["address"] == "10.9.0.2/24"
    assert stdins[1]["runtimeConfig"] == {"portMappings": [1]}
    assert stdins[2]["prevResult"] == result and stdins[3]["prevResult"] == result
    parsed = cni.parse_result(result)
    assert parsed.ips[0] == cni.IpConfig(address="10.9.0.2/24", gateway="10.9.0.1", interface=0)
    assert parsed.dns.nameservers == ("10.9.0.1",)
    assert parsed.routes == (("0.0.0.0/0", ""),)


def test_plugin_error_object_becomes_the_message(tmp_path: Path) -> None:
    path = fake_plugins(tmp_path, "first", "failing")
    networks = conflist.parse(
        {"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "first"}, {"type": "failing"}]},
        tmp_path / "n",
    )
    attachment = cni.Attachment(container_id="vm1", netns="")
    with pytest.raises(NetworkError, match='CNI plugin "failing" failed ADD: no luck \\(for testing\\)'):
        asyncio.run(cni.add(networks, attachment, path))
    # DEL goes on past a failing plugin, then reports it.
    with pytest.raises(NetworkError, match="failed DEL"):
        asyncio.run(cni.delete(networks, attachment, path, None))
    assert (tmp_path / "calls.log").read_text().splitlines()[-1] == "first DEL vm1 eth0 "


@pytest.mark.parametrize(
    ("result", "problem"),
    [
        ([], "not a JSON object"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.300/24"}]}, "invalid address"),
        ({"cniVersion": "1.0.0", "routes": [{"gw": "10.0.0.1"}]}, "invalid route"),
        ({"cniVersion": "1.0.0", "interfaces": [{"mac": "x"}]}, "invalid interface"),
    ],
)
def test_invalid_results_are_rejected(result: object, problem: str) -> None:
    with pytest.raises(NetworkError, match=problem):
        cni.parse_result(result)


def test_result_of_an_older_spec_version() -> None:
    parsed = cni.parse_result(
        {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.1.0.3/16", "gateway": "10.1.0.1"}]}
    )
    assert parsed.ips == (cni.IpConfig(address="10.1.0.3/16", gateway="10.1.0.1"),)
    assert parsed.dns == cni.Dns()


def test_plugins_are_executables(tmp_path: Path) -> None:
    (tmp_path / "bridge").write_text("not executable")
    os.chmod(tmp_path / "bridge", 0o644)
    with pytest.raises(NetworkError, match='"bridge"'):
        conflist.find_plugin("bridge", (tmp_path,), tmp_path / "x.conflist")


def test_a_plugin_that_never_finishes_is_killed_at_its_deadline_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = tmp_path / "stuck"
    plugin.write_text("#!/bin/sh\nexec sleep 600\n")
    plugin.chmod(0o755)
    monkeypatch.setattr(cni, "PLUGIN_TIMEOUT", 0.3)
    networks = conflist.parse(
        {"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "stuck"}]}, tmp_path / "n"
    )
    with pytest.raises(NetworkError, match='CNI plugin "stuck" did not finish ADD in 0s'):
        asyncio.run(cni.add(networks, cni.Attachment(container_id="vm1", netns=""), (tmp_path,)))
