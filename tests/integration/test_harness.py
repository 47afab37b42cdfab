"""The private systemd harness itself: a real systemd, bus and journal."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from tests.harness.fixtures import artifacts_dir
from tests.harness.systemd import PrivateSystemd, host_leftovers


def test_bus_lists_systemd(systemd: PrivateSystemd) -> None:
    names = systemd.run("busctl", "list", "--no-pager").stdout
    assert "org.freedesktop.systemd1" in names


def test_bus_reachable_from_test_process(systemd: PrivateSystemd) -> None:
    result = subprocess.run(
        [
            "busctl",
            f"--address={systemd.bus_address}",
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "GetId",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith("s ")


def test_journal_reads_back_a_logged_line(systemd: PrivateSystemd) -> None:
    marker = f"spinbox-harness-{uuid.uuid4()}"
    systemd.run("systemd-cat", "-t", "spinbox-test", "echo", marker)
    systemd.wait_for(
        "the line in the journal",
        lambda: marker in systemd.journal("-t", "spinbox-test", "-o", "cat"),
    )


def test_transient_scope_records_limits(systemd: PrivateSystemd) -> None:
    systemd.run("systemd-run", "--unit=harness-probe", "--scope", "-p", "MemoryMax=64M", "sleep", "2")
    # The scope is gone again; a running one keeps its properties:
    systemd.run("systemd-run", "--unit=harness-probe2", "-p", "MemoryMax=64M", "sleep", "30")
    try:
        assert systemd.unit_property("harness-probe2.service", "MemoryMax") == str(64 * 1024 * 1024)
    finally:
        systemd.systemctl("stop", "harness-probe2.service")


def test_teardown_leaves_nothing() -> None:
    with PrivateSystemd.booted(artifacts_dir() / "logs") as instance:
        pid = instance.pid
        cgroup = instance.cgroup
        # A duration no other test uses, so the check below sees only this sleeper.
        instance.run("systemd-run", "--unit=harness-sleeper", "sleep", "86401")
        assert instance.processes("sleep 86401")
    assert not cgroup.exists()
    assert not Path(f"/proc/{pid}").exists()
    assert not host_leftovers(["^sleep 86401$"])
