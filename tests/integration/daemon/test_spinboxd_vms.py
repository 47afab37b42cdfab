"""Real VMs through spinboxd: scopes, journal, restart, stop, and nothing left behind."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio.message_bus import MessageBus

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
    restarted = spinbox.run("date", "+%Y-%m-%d %H:%M:%S.%N").stdout.strip()[:26]
    stop(spinbox, path)
    assert leftovers(spinbox) == NOTHING
    # The console and the log port are forwarded again after the restart: the
    # kernel's and vminitd's last words arrive.
    after = spinbox.journal("-u", "spinbox-vm-vm-r.scope", "--since", restarted, "-o", "json").splitlines()
    sources = {json.loads(line).get("SYSLOG_IDENTIFIER") for line in after}
    assert {"spinbox-console", "vminitd"} <= sources
    assert spinbox.unit_property("spinbox.service", "StatusText") == "0 VMs running"


def test_kill_releases_everything_and_signals_come(spinbox: PrivateSystemd) -> None:
    async def watch() -> list[tuple[str, list[object]]]:
        bus = await MessageBus(bus_address=spinbox.bus_address, bus_type=BusType.SYSTEM).connect()
        seen: list[tuple[str, list[object]]] = []

        def on_message(msg: Message) -> None:
            if msg.interface in (MANAGER_IFACE, "org.freedesktop.DBus.Properties") and msg.path:
                seen.append((str(msg.member), list(msg.body)))

        bus.add_message_handler(on_message)
        reply = await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[f"type='signal',sender='{BUS}'"],
            )
        )
        assert reply is not None and reply.message_type == MessageType.METHOD_RETURN
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(None, create, spinbox, "vm-k")
        await loop.run_in_executor(None, lambda: busctl(spinbox, "call", BUS, path, VM_IFACE, "Kill"))
        await asyncio.sleep(0.5)
        bus.disconnect()
        return seen

    seen = asyncio.run(watch())
    path = "/org/spinstack/Spinbox/vm/vm_2dk"
    assert ("VMAdded", ["vm-k", path]) in seen
    assert ("VMRemoved", ["vm-k", path]) in seen
    states = [body[1]["State"].value for member, body in seen if member == "PropertiesChanged"]
    assert states[:2] == ["stopping", "stopped"]
    assert leftovers(spinbox) == NOTHING


def test_a_crash_during_create_is_cleaned_up_when_spinboxd_comes_back(spinbox: PrivateSystemd) -> None:
    scope = "spinbox-vm-vm-crash.scope"
    call = ("call", BUS, MANAGER_PATH, MANAGER_IFACE, "CreateVM", "sa{sv}", "vm-crash", "0")
    client = spinbox.popen("busctl", "--timeout=300", *call, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        spinbox.wait_for("the VM's scope", lambda: spinbox.unit_property(scope, "ActiveState") == "active")
        started = spinbox.unit_property("spinbox.service", "ExecMainStartTimestampMonotonic")
        # Only spinboxd dies: QEMU is in its own scope.
        spinbox.systemctl("kill", "--kill-who=main", "--signal=KILL", "spinbox.service")
    finally:
        client.communicate(timeout=60)
    spinbox.wait_for(
        "spinboxd restarted",
        lambda: (
            spinbox.unit_property("spinbox.service", "ExecMainStartTimestampMonotonic") != started
            and spinbox.unit_property("spinbox.service", "ActiveState") == "active"
        ),
        timeout=60,
    )
    assert "cleaning up VM vm-crash" in spinbox.journal("-u", "spinbox.service", "-o", "cat")
    assert leftovers(spinbox) == NOTHING


def test_rootfs_is_mounted_synced_and_released(spinbox: PrivateSystemd) -> None:
    snapshots = "/var/lib/containerd/spinbox-test"
    spinbox.run("mkdir", "-p", f"{snapshots}/1/fs/etc", f"{snapshots}/2/fs", f"{snapshots}/2/work")
    spinbox.write_file(f"{snapshots}/1/fs/etc/hostname", "layer\n")
    mount = ["overlay", "overlay", "", "3", f"workdir={snapshots}/2/work", f"upperdir={snapshots}/2/fs",
             f"lowerdir={snapshots}/1/fs"]  # fmt: skip
    try:
        path = create(spinbox, "vm-fs", ("rootfs", "a(sssas)", "1", *mount), ("container-id", "s", "box"))
        rootfs = get_property(spinbox, path, VM_IFACE, "RootfsPath")
        assert isinstance(rootfs, str) and rootfs.startswith("/")
        busctl(spinbox, "call", BUS, path, VM_IFACE, "Pause")
        assert get_property(spinbox, path, VM_IFACE, "State") == "paused"
        busctl(spinbox, "call", BUS, path, VM_IFACE, "Resume")
        assert get_property(spinbox, path, VM_IFACE, "State") == "running"
        busctl(spinbox, "call", BUS, path, VM_IFACE, "SyncRootfs")
        stop(spinbox, path)
    finally:
        spinbox.run("rm", "-rf", snapshots)
    assert leftovers(spinbox) == NOTHING
    refs = spinbox.path("/var/lib/spinbox/layers/refs")
    assert not refs.exists() or not any(refs.rglob("*.ref")), sorted(refs.rglob("*"))


def test_a_prepared_network_namespace_is_used_and_removed(spinbox: PrivateSystemd) -> None:
    result = busctl(
        spinbox,
        "--json=short",
        "call",
        BUS,
        MANAGER_PATH,
        MANAGER_IFACE,
        "PrepareNetworkNamespace",
        "s",
        "vm-n",
    )
    netns, pid = json.loads(result.stdout)["data"]
    assert spinbox.path(netns).exists()
    assert spinbox.path(f"/proc/{pid}").exists()
    path = create(spinbox, "vm-n", ("netns", "s", netns))
    assert get_property(spinbox, path, VM_IFACE, "State") == "running"
    stop(spinbox, path)
    assert not spinbox.path(netns).exists()
    assert leftovers(spinbox) == NOTHING


def test_twenty_create_stop_cycles_leave_nothing(spinbox: PrivateSystemd) -> None:
    for i in range(20):
        path = create(spinbox, f"cycle-{i}", ("memory-mib", "t", "256"))
        stop(spinbox, path)
    assert leftovers(spinbox) == NOTHING
    for directory in ("/var/lib/spinbox/vms", "/run/spinbox/net", "/run/spinbox/netns", "/run/spinbox/cid"):
        found = spinbox.path(directory)
        assert not found.exists() or not any(found.iterdir()), directory
