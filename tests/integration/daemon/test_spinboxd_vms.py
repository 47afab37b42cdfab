"""Real VMs through spinboxd: scopes, journal, restart, stop, and nothing left behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from spinbox.config import VmConfig
from tests.harness.systemd import PrivateSystemd
from tests.integration.daemon.spinboxd import (
    BUS,
    MANAGER_IFACE,
    MANAGER_PATH,
    PYTHON,
    TOP,
    VM_IFACE,
    busctl,
    get_property,
    installed,
    leftovers,
)

NOTHING: dict[str, object] = {"scopes": [], "qemu": [], "files": [], "netns": []}
MIB = 1024 * 1024
OVERHEAD_MIB = VmConfig().memory_overhead_mib


@pytest.fixture(scope="module")
def spinbox(systemd: PrivateSystemd, guest_image: Path) -> Iterator[PrivateSystemd]:
    with installed(systemd, config=f'[vm]\ninitrd = "{guest_image}"\n'):
        systemd.systemctl("start", "spinbox.service")
        yield systemd
        assert leftovers(systemd) == NOTHING


def create(systemd: PrivateSystemd, vm_id: str, *options: tuple[str, ...], check: bool = True) -> str:
    """CreateVM through busctl; each option is (name, signature, value...)."""
    args = [word for option in options for word in option]
    call = ("call", BUS, MANAGER_PATH, MANAGER_IFACE, "CreateVM", "sa{sv}", vm_id, str(len(options)))
    result = busctl(systemd, "--timeout=300", *call, *args, check=check)
    return result.stdout.strip().removeprefix("o ").strip('"') if result.returncode == 0 else result.stderr


def stop(systemd: PrivateSystemd, path: str) -> None:
    busctl(systemd, "--timeout=120", "call", BUS, path, VM_IFACE, "Stop", "t", "30000")


def spinboxctl(systemd: PrivateSystemd, *args: str) -> str:
    return systemd.run("env", f"PYTHONPATH={TOP}", str(PYTHON), "-m", "spinbox.cli", *args).stdout


def test_a_vm_runs_in_its_own_scope_and_logs_to_the_journal(spinbox: PrivateSystemd) -> None:
    options = [("vcpus", "u", "2"), ("memory-mib", "t", "384"), ("kernel-args", "as", "1", "loglevel=6")]
    path = create(spinbox, "vm-a", *options)
    assert path == "/org/spinstack/Spinbox/vm/vm_2da"
    try:
        scope = "spinbox-vm-vm-a.scope"
        assert get_property(spinbox, path, VM_IFACE, "Scope") == scope
        assert get_property(spinbox, path, VM_IFACE, "State") == "running"
        assert spinbox.unit_property(scope, "ActiveState") == "active"
        assert spinbox.unit_property(scope, "Slice") == "spinbox.slice"
        assert spinbox.unit_property(scope, "MemoryMax") == str((384 + OVERHEAD_MIB) * MIB)
        assert spinbox.unit_property(scope, "CPUQuotaPerSecUSec") == "2s"
        pid = get_property(spinbox, path, VM_IFACE, "Pid")
        # cgroup.procs shows pids of the reader's pid namespace: read it inside.
        procs = spinbox.run("cat", f"/sys/fs/cgroup/spinbox.slice/{scope}/cgroup.procs").stdout.split()
        assert str(pid) in procs
        assert "qemu-system" in spinbox.path(f"/proc/{pid}/cmdline").read_text()

        def journal_has(*lines: str) -> bool:
            text = spinbox.journal("-u", scope, "-o", "cat")
            return all(line in text for line in lines)

        # Kernel messages on the serial console, and vminitd's own log port.
        spinbox.wait_for("console and vminitd lines", lambda: journal_has("Linux version"))
        entries = [json.loads(line) for line in spinbox.journal("-u", scope, "-o", "json").splitlines()]
        sources = {(e.get("SYSLOG_IDENTIFIER"), e.get("SPINBOX_VM")) for e in entries}
        assert ("spinbox-console", "vm-a") in sources
        assert ("vminitd", "vm-a") in sources
        vminitd = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "vminitd"]
        assert any("agent listening" in e["MESSAGE"] for e in vminitd)

        timeline = get_property(spinbox, path, VM_IFACE, "BootTimeline")
        assert isinstance(timeline, dict)
        assert 0 < timeline["qemu-started"] < timeline["agent-ready"] <= timeline["guest-configured"]

        listing = spinboxctl(spinbox, "list")
        assert "vm-a" in listing and "running" in listing and str(pid) in listing
        assert "agent-ready" in spinboxctl(spinbox, "timeline", "vm-a")
        assert scope in spinboxctl(spinbox, "status", "vm-a")
        assert "Linux version" in spinboxctl(spinbox, "logs", "vm-a")

        again = create(spinbox, "vm-a", check=False)
        assert "already exists" in again
    finally:
        spinboxctl(spinbox, "stop", "vm-a")
    assert leftovers(spinbox) == NOTHING
    assert "not found" in busctl(
        spinbox, "call", BUS, MANAGER_PATH, MANAGER_IFACE, "GetVM", "s", "vm-a", check=False
    ).stderr.replace("there is no VM", "not found")


def test_restart_keeps_the_vm_running(spinbox: PrivateSystemd) -> None:
    path = create(spinbox, "vm-r")
    pid = get_property(spinbox, path, VM_IFACE, "Pid")
    spinbox.systemctl("restart", "spinbox.service")
    assert spinbox.unit_property("spinbox.service", "StatusText") == "1 VM running"
    assert busctl(spinbox, "call", BUS, MANAGER_PATH, MANAGER_IFACE, "GetVM", "s", "vm-r").stdout.strip() == (
        f'o "{path}"'
    )
    assert get_property(spinbox, path, VM_IFACE, "Pid") == pid
    assert get_property(spinbox, path, VM_IFACE, "State") == "running"
    assert spinbox.path(f"/proc/{pid}").exists()
    # The console is forwarded again: a line QEMU prints after the restart arrives.
    stop(spinbox, path)
    assert leftovers(spinbox) == NOTHING
    assert spinbox.unit_property("spinbox.service", "StatusText") == "0 VMs running"


def test_kill_releases_everything(spinbox: PrivateSystemd) -> None:
    path = create(spinbox, "vm-k")
    busctl(spinbox, "call", BUS, path, VM_IFACE, "Kill")
    assert leftovers(spinbox) == NOTHING


def test_twenty_create_stop_cycles_leave_nothing(spinbox: PrivateSystemd) -> None:
    for i in range(20):
        path = create(spinbox, f"cycle-{i}", ("memory-mib", "t", "256"))
        stop(spinbox, path)
    assert leftovers(spinbox) == NOTHING
    for directory in ("/var/lib/spinbox/vms", "/run/spinbox/net", "/run/spinbox/netns", "/run/spinbox/cid"):
        found = spinbox.path(directory)
        assert not found.exists() or not any(found.iterdir()), directory
