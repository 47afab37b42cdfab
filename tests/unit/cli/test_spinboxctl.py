"""spinboxctl's own logic: which VM an id names, the CNI plugins and user namespaces check
names, and top's readings of a scope's cgroup."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from spinbox.cli import top
from spinbox.cli.__main__ import candidates, cmd_list, parser
from spinbox.cli.check import cni_rows, user_namespaces_row
from spinbox.config import Config


def test_a_container_id_names_its_vm_in_the_default_namespace() -> None:
    assert candidates("u1", "default") == ["default-u1", "u1"]
    assert candidates("u1", "k8s.io") == ["k8s.io-u1", "u1"]
    # The full VM id is still accepted (after the container reading of it).
    assert candidates("default-u1", "default") == ["default-default-u1", "default-u1"]
    args = parser().parse_args(["status", "u1"])
    assert (args.id, args.namespace) == ("u1", "default")
    args = parser().parse_args(["logs", "-n", "other", "-f", "u1"])
    assert (args.id, args.namespace, args.follow) == ("u1", "other", True)
    assert parser().parse_args(["top", "--once"]).once


class TwoVms:
    async def vms(self) -> list[dict[str, Any]]:
        return [
            {
                "Namespace": "default",
                "ContainerId": "u1",
                "Id": "default-u1",
                "State": "running",
                "Pid": 7,
                "Scope": "s",
            },
            {"Id": "pod-x", "State": "running", "Pid": 8, "Scope": "t"},
        ]


def test_list_quiet_prints_only_the_vm_ids(capsys: pytest.CaptureFixture[str]) -> None:
    """Scripts (the package's prerm among them) read the ids from `list -q`, not from a column."""
    args = parser().parse_args(["list", "-q"])
    assert asyncio.run(cmd_list(TwoVms(), args)) == 0  # type: ignore[arg-type]
    assert capsys.readouterr().out == "default-u1\npod-x\n"
    asyncio.run(cmd_list(TwoVms(), parser().parse_args(["list"])))  # type: ignore[arg-type]
    header, first, _second = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["NAMESPACE", "CONTAINER", "ID"] and first.split()[:3] == [
        "default",
        "u1",
        "default-u1",
    ]


def config_with(conflist: Path, plugins: Path) -> Config:
    return Config(network=(("conflist", str(conflist)), ("plugin-path", [str(plugins)])))


def test_check_names_each_cni_plugin_and_whether_it_is_there(tmp_path: Path) -> None:
    conflist = tmp_path / "net.conflist"
    plugins = [{"type": "bridge", "ipam": {"type": "host-local"}}, {"type": "firewall"}]
    conflist.write_text(json.dumps({"cniVersion": "1.0.0", "name": "n", "plugins": plugins}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bridge").write_text("")
    rows = cni_rows(config_with(conflist, bin_dir))
    assert [row[:2] for row in rows] == [
        ["cni/bridge", "ok"],
        ["cni/host-local", "FAIL"],
        ["cni/firewall", "FAIL"],
    ]
    assert rows[0][2] == str(bin_dir / "bridge")
    assert f"not in {bin_dir} (apt install containernetworking-plugins)" in rows[1][2]


def test_check_says_when_the_network_list_is_unreadable(tmp_path: Path) -> None:
    rows = cni_rows(config_with(tmp_path / "missing.conflist", tmp_path))
    assert rows[0][:2] == ["cni", "FAIL"]
    assert "missing.conflist does not exist" in rows[0][2]
    assert cni_rows(Config(network=(("enabled", False),)))[0][:2] == ["cni", "ok"]


def test_check_warns_when_user_namespaces_are_off(tmp_path: Path) -> None:
    limit = tmp_path / "max_user_namespaces"
    limit.write_text("15000\n")
    assert user_namespaces_row(limit)[:2] == ["user namespaces", "ok"]
    limit.write_text("0\n")
    row = user_namespaces_row(limit)
    assert row[:2] == ["user namespaces", "warn"] and "cannot start its confined virtiofsd" in row[2]
    assert user_namespaces_row(tmp_path / "missing")[1] == "warn"


def test_top_finds_the_cgroup2_mount_and_reads_usage(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "25 1 0:23 / /sys/fs/cgroup/memory rw,nosuid shared:9 - cgroup cgroup rw,memory\n"
        "26 1 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n"
    )
    # A cgroup2 mount made in another cgroup namespace shows its own root.
    mountinfo.write_text(
        mountinfo.read_text() + "30 1 0:24 /spinbox-test-a /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    )
    assert top.cgroup2_mounts(mountinfo) == [
        top.Cgroup2Mount(Path("/sys/fs/cgroup/unified"), "/"),
        top.Cgroup2Mount(Path("/sys/fs/cgroup"), "/spinbox-test-a"),
    ]
    # A process's cgroup, through the last mount that shows it as a directory.
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text("1:cpu:/\n0::/test-a/spinbox.slice/vm.scope\n")
    scope = "test-a/spinbox.slice/vm.scope"
    (tmp_path / "a" / scope).mkdir(parents=True)
    (tmp_path / "b").mkdir()
    mounts = [top.Cgroup2Mount(tmp_path / "a", "/"), top.Cgroup2Mount(tmp_path / "b", "/test-a")]
    assert top.cgroup_of(42, mounts, proc) == tmp_path / "a" / scope  # b lacks it
    (tmp_path / "b" / "spinbox.slice" / "vm.scope").mkdir(parents=True)
    assert top.cgroup_of(42, mounts, proc) == tmp_path / "b" / "spinbox.slice" / "vm.scope"
    assert top.cgroup_of(42, [top.Cgroup2Mount(tmp_path / "a", "/elsewhere-only")], proc) is None
    assert top.cgroup_of(43, mounts, proc) is None
    scope = tmp_path / "spinbox-vm-default-u1.scope"
    scope.mkdir()
    (scope / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    first = top.read_usage(scope)
    assert first.cpu_usec == 1_500_000 and first.memory is None
    assert (top.cpu_time(first), top.memory(first)) == ("1.5s", "-")
    (scope / "cpu.stat").write_text("usage_usec 2000000\n")
    (scope / "memory.current").write_text(str(96 << 20))
    later = top.Usage(2_000_000, 96 << 20, first.at + 1.0)
    assert top.cpu_percent(first, later) == "50.0"
    assert top.memory(top.read_usage(scope)) == "96.0 MiB"
    assert top.cpu_percent(first, top.Usage(None, None, later.at)) == "-"
