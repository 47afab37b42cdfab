"""Real VMs through spinboxd: scopes, journal, restart, stop, and nothing left behind."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio.message_bus import MessageBus

from spinbox.agent import AgentClient
from spinbox.config import VmConfig
from spinbox.shim.guestwatch import GuestWatch
from spinbox.shim.spinboxd import Spinboxd
from spinbox.ttrpc import Code, TtrpcError
from tests.harness.systemd import PrivateSystemd
from tests.integration.daemon.spinboxd import (
    BUS,
    CONFIG,
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
from tests.integration.guest.oci import busybox_rootfs
from tests.integration.guest.oci import spec as oci_spec

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
        # An OOM kill in the scope ends all of it: QEMU never runs on without its companions.
        assert spinbox.unit_property(scope, "OOMPolicy") == "kill"
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
        # Filed under the scope itself (sent with QEMU's pid), not under spinbox.service.
        forwarded = [e for e in entries if e.get("SPINBOX_VM") == "vm-a"]
        assert {e.get("_SYSTEMD_UNIT") for e in forwarded} == {scope}
        assert {e.get("_PID") for e in forwarded} == {str(pid)}
        # (The service's journal is shared with the tests before this one, template builds included.)
        service = spinbox.journal("-u", "spinbox.service", "-o", "json").splitlines()
        mine = [e for e in map(json.loads, service) if e.get("SPINBOX_VM") == "vm-a"]
        assert not [e for e in mine if "agent listening" in str(e.get("MESSAGE"))]

        timeline = get_property(spinbox, path, VM_IFACE, "BootTimeline")
        assert isinstance(timeline, dict)
        assert 0 < timeline["qemu-started"] < timeline["agent-ready"] <= timeline["guest-configured"]

        listing = spinboxctl(spinbox, "list")
        assert "vm-a" in listing and "running" in listing and str(pid) in listing
        assert "agent-ready" in spinboxctl(spinbox, "timeline", "vm-a")
        # On spinbox's default network: one address, shown by spinboxctl too.
        addresses = get_property(spinbox, path, VM_IFACE, "Addresses")
        assert isinstance(addresses, list) and len(addresses) == 1
        address = addresses[0]
        assert address.startswith("10.77.") and address.endswith("/16")
        status = spinboxctl(spinbox, "status", "vm-a")
        assert scope in status and address in status
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
    """Here the VM's state is left as the previous release wrote it (two files):
    an upgrade that restarts spinboxd adopts it and merges the files."""
    with snapshot(spinbox, "r") as rootfs:
        path = create(spinbox, "vm-r", rootfs)
        state = spinbox.path("/run/spinbox/vm/vm-r/vm.json")
        sections = json.loads(state.read_text())
        assert set(sections) == {"machine", "daemon"}
        state.with_name("state.json").write_text(json.dumps(sections["daemon"]))
        state.write_text(json.dumps(sections["machine"]))
        restart_and_stop(spinbox, path)
    assert no_layer_references(spinbox)


def restart_and_stop(spinbox: PrivateSystemd, path: str) -> None:
    rootfs = get_property(spinbox, path, VM_IFACE, "RootfsPath")
    pid = get_property(spinbox, path, VM_IFACE, "Pid")
    spinbox.systemctl("restart", "spinbox.service")
    assert spinbox.unit_property("spinbox.service", "StatusText") == "1 VM running"
    assert busctl(spinbox, "call", BUS, MANAGER_PATH, MANAGER_IFACE, "GetVM", "s", "vm-r").stdout.strip() == (
        f'o "{path}"'
    )
    assert get_property(spinbox, path, VM_IFACE, "Pid") == pid
    assert get_property(spinbox, path, VM_IFACE, "State") == "running"
    assert get_property(spinbox, path, VM_IFACE, "RootfsPath") == rootfs
    assert spinbox.path(f"/proc/{pid}").exists()
    assert sorted(p.name for p in spinbox.path("/run/spinbox/vm/vm-r").glob("*.json")) == ["vm.json"]
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
    # The restarted spinboxd serves first, then cleans up (in order: the guest is shut down).
    spinbox.wait_for("the half-made VM cleaned up", lambda: leftovers(spinbox) == NOTHING, timeout=120)
    assert "cleaning up VM vm-crash" in spinbox.journal("-u", "spinbox.service", "-o", "cat")


def test_stopping_spinboxd_during_a_create_undoes_it(spinbox: PrivateSystemd) -> None:
    call = ("call", BUS, MANAGER_PATH, MANAGER_IFACE, "CreateVM", "sa{sv}", "vm-stop", "0")
    client = spinbox.popen("busctl", "--timeout=300", *call, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        spinbox.wait_for(
            "the VM's scope",
            lambda: spinbox.unit_property("spinbox-vm-vm-stop.scope", "ActiveState") == "active",
        )
        spinbox.systemctl("stop", "spinbox.service")
        _, err = client.communicate(timeout=60)
        assert spinbox.unit_property("spinbox.service", "Result") == "success"
        assert b"Call failed" in err
        # Undone by the stopping spinboxd itself, not by the next one.
        assert leftovers(spinbox) == NOTHING
    finally:
        client.kill()
        spinbox.systemctl("start", "spinbox.service")


@contextlib.contextmanager
def snapshot(systemd: PrivateSystemd, name: str) -> Iterator[tuple[str, ...]]:
    """An overlayfs snapshot as containerd mounts it; yields the CreateVM "rootfs" option."""
    root = f"/var/lib/containerd/spinbox-test-{name}"
    systemd.run("mkdir", "-p", f"{root}/1/fs/etc", f"{root}/2/fs", f"{root}/2/work")
    systemd.write_file(f"{root}/1/fs/etc/hostname", "layer\n")
    mount = ("overlay", "overlay", "", "3", f"workdir={root}/2/work", f"upperdir={root}/2/fs",
             f"lowerdir={root}/1/fs")  # fmt: skip
    try:
        yield ("rootfs", "a(sssas)", "1", *mount)
    finally:
        systemd.run("rm", "-rf", root)


def no_layer_references(systemd: PrivateSystemd) -> bool:
    refs = systemd.path("/var/lib/spinbox/layers/refs")
    return not refs.exists() or not any(refs.rglob("*.ref"))


def test_rootfs_is_mounted_synced_and_released(spinbox: PrivateSystemd) -> None:
    with snapshot(spinbox, "fs") as rootfs:
        path = create(spinbox, "vm-fs", rootfs, ("container-id", "s", "box"))
        assert str(get_property(spinbox, path, VM_IFACE, "RootfsPath")).startswith("/")
        busctl(spinbox, "call", BUS, path, VM_IFACE, "Pause")
        assert get_property(spinbox, path, VM_IFACE, "State") == "paused"
        busctl(spinbox, "call", BUS, path, VM_IFACE, "Resume")
        assert get_property(spinbox, path, VM_IFACE, "State") == "running"
        busctl(spinbox, "call", BUS, path, VM_IFACE, "SyncRootfs")
        # A paused VM is resumed to stop in order (it unmounts and syncs first).
        busctl(spinbox, "call", BUS, path, VM_IFACE, "Pause")
        stop(spinbox, path)
    vminitd = spinbox.journal("-u", "spinbox-vm-vm-fs.scope", "-t", "vminitd", "-o", "cat")
    assert "unmounted the rootfs of container box" in vminitd
    assert leftovers(spinbox) == NOTHING
    assert no_layer_references(spinbox)


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


def test_a_guest_that_never_comes_up_fails_the_create_and_leaves_nothing(spinbox: PrivateSystemd) -> None:
    config = spinbox.path(CONFIG).read_text()
    # Not an initramfs: the kernel finds no init, panics, and QEMU exits.
    spinbox.write_file(CONFIG, '[vm]\ninitrd = "/etc/hostname"\n')
    spinbox.systemctl("restart", "spinbox.service")
    try:
        error = create(spinbox, "vm-bad", check=False)
    finally:
        spinbox.write_file(CONFIG, config)
        spinbox.systemctl("restart", "spinbox.service")
    assert "VM 'vm-bad' could not be created" in error
    assert "journalctl -u spinbox-vm-vm-bad.scope" in error
    assert "Kernel panic" in spinbox.journal("-u", "spinbox-vm-vm-bad.scope", "-o", "cat")
    assert leftovers(spinbox) == NOTHING


def add_rootfs(
    systemd: PrivateSystemd, path: str, container_id: str, rootfs: tuple[str, ...], check: bool = True
) -> subprocess.CompletedProcess[str]:
    """AddRootfs through busctl with the mounts of a snapshot() option."""
    mounts = rootfs[2:]  # drop the option's name and signature
    call = ("call", BUS, path, VM_IFACE, "AddRootfs", "sa(sssas)", container_id, *mounts)
    return busctl(systemd, "--timeout=300", *call, check=check)


async def run_in_guest(address: str, container_id: str, *args: str) -> int:
    """Run a container to its end on a rootfs the guest has mounted; its exit status."""
    agent = await AgentClient.connect(address)
    try:
        await agent.create_container(container_id, oci_spec(*args))
        await agent.start(container_id)
        status = (await agent.wait(container_id)).exit_status
        await agent.delete_container(container_id)
        return status
    finally:
        await agent.close()


def test_a_pod_adds_and_removes_rootfses_in_its_running_vm(spinbox: PrivateSystemd) -> None:
    with (
        snapshot(spinbox, "pod0") as pause,
        snapshot(spinbox, "pod1") as app,
        snapshot(spinbox, "pod2") as side,
    ):
        app_root = "/var/lib/containerd/spinbox-test-pod1"
        busybox_rootfs(spinbox.path(f"{app_root}/1/fs"))
        path = create(spinbox, "vm-pod", pause, ("container-id", "s", "pause"), ("hotplug-ports", "u", "4"))
        added = add_rootfs(spinbox, path, "app", app)
        guest_path = added.stdout.split(maxsplit=1)[1].strip().strip('"')
        assert guest_path.startswith("/") and guest_path.endswith("/app")
        # A container runs on the added rootfs; what it writes reaches the snapshot.
        agent = "unix:" + str(spinbox.path("/run/spinbox/vm/vm-pod/agent.sock"))
        assert asyncio.run(run_in_guest(agent, "app", "sh", "-c", "echo pod > /written")) == 0
        busctl(spinbox, "--timeout=120", "call", BUS, path, VM_IFACE, "SyncRootfs")
        assert spinbox.path(f"{app_root}/2/fs/written").read_text() == "pod\n"

        again = add_rootfs(spinbox, path, "app", app, check=False)
        assert "org.spinstack.Spinbox.Error.AlreadyExists" in again.stderr or "already has" in again.stderr
        bad = add_rootfs(spinbox, path, "bad", ("", "", "1", "", "", "", "0"), check=False)
        assert bad.returncode != 0 and "has no type" in bad.stderr
        missing = busctl(spinbox, "call", BUS, path, VM_IFACE, "RemoveRootfs", "s", "nope", check=False)
        assert missing.returncode != 0 and "no added rootfs for container 'nope'" in missing.stderr

        # A restarted spinboxd re-adopts the VM with its added rootfs.
        spinbox.systemctl("restart", "spinbox.service")
        path = busctl(spinbox, "call", BUS, MANAGER_PATH, MANAGER_IFACE, "GetVM", "s", "vm-pod").stdout
        path = path.split()[1].strip('"')
        busctl(spinbox, "--timeout=120", "call", BUS, path, VM_IFACE, "RemoveRootfs", "s", "app")
        # Its disks' ports are free again; a VM that stops releases what is still added.
        add_rootfs(spinbox, path, "app", app)
        add_rootfs(spinbox, path, "side", side)
        # Two disks each (a layer and the writable one): the four ports are taken.
        full = add_rootfs(spinbox, path, "more", side, check=False)
        assert full.returncode != 0 and "no spare PCIe port left" in full.stderr
        assert not spinbox.path("/var/lib/spinbox/vms/vm-pod/rootfs-more").exists()
        stop(spinbox, path)
    vminitd = spinbox.journal("-u", "spinbox-vm-vm-pod.scope", "-t", "vminitd", "-o", "cat")
    assert "mounted the rootfs of container side" in vminitd
    assert "unmounted the rootfs of container app" in vminitd
    assert leftovers(spinbox) == NOTHING
    assert no_layer_references(spinbox)


# The container's process: a busy loop at the highest real-time priority, with the kernel's
# real-time throttling off, on the guest's one vCPU. Nothing else of the guest's user space
# runs (vminitd is alive, and never scheduled), while its kernel still takes interrupts.
WEDGE = "echo -1 > /proc/sys/kernel/sched_rt_runtime_us; exec chrt -f 99 sh -c 'while :; do :; done'"
# util-linux's chrt (busybox-static has none) and what it links with.
CHRT = ("/usr/bin/chrt", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2")


def wedging_spec() -> bytes:
    doc = json.loads(oci_spec("sh", "-c", WEDGE))
    doc["linux"]["readonlyPaths"] = ["/proc/sysrq-trigger"]  # /proc/sys is writable
    caps = ["CAP_SYS_NICE"]
    doc["process"]["capabilities"] = {k: caps for k in ("bounding", "effective", "permitted")}
    return json.dumps(doc).encode()


async def wedge_the_guest(address: str, bus_address: str, path: str) -> str:
    """Starts the wedging container; returns the sentence of the first call that then misses
    its deadline (5 s), once the shim's GuestWatch had spinboxd record where the guest is."""
    agent = await AgentClient.connect(address, call_timeout=5)
    watch = GuestWatch(functools.partial(Spinboxd.connect, bus_address), "vm-stall", path)
    agent.on_deadline = watch
    try:
        await agent.create_container("hog", wedging_spec())
        await agent.start("hog")
        for _ in range(20):
            try:
                await agent.pids("hog")
            except TtrpcError as error:
                assert error.code == Code.DEADLINE_EXCEEDED, error
                assert watch.task is not None
                await watch.task
                return error.message
            await asyncio.sleep(0.5)
        raise AssertionError("the wedged guest's agent kept answering")
    finally:
        await agent.close()


def test_a_guest_that_stops_answering_has_where_it_is_recorded(spinbox: PrivateSystemd) -> None:
    root = "/var/lib/containerd/spinbox-test-stall"
    busybox_rootfs(spinbox.path(f"{root}/fs"))
    for program in CHRT:
        target = spinbox.path(f"{root}/fs{program}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(program, target)
    rootfs = ("rootfs", "a(sssas)", "1", "bind", f"{root}/fs", "", "2", "ro", "rbind")  # read-only
    path = create(spinbox, "vm-stall", rootfs, ("container-id", "s", "hog"))
    scope = "spinbox-vm-vm-stall.scope"
    try:
        agent = f"unix:{spinbox.path('/run/spinbox/vm/vm-stall/agent.sock')}"
        reason = asyncio.run(wedge_the_guest(agent, spinbox.bus_address, path))
        assert reason == "spinbox.agent.v1.Agent/Pids: the guest did not answer within 5 s"

        record = spinbox.journal("-u", scope, "-t", "spinboxd", "-o", "cat").splitlines()
        assert record[0] == f"recording where the guest is: {reason}"
        assert record[1] == "QEMU's vCPUs are running: 1 vCPUs"
        # The busy loop keeps the vCPU's thread busy; where it is changes from one moment to the next.
        address = "0x[0-9a-f]{16}"
        assert re.fullmatch(
            rf"vCPU 0: thread \d+ used \d+% of a host CPU; running in (user|kernel) mode at RIP {address}, "
            rf"RSP {address}, CR3 0x[0-9a-f]+, interrupts (on|off); 1 s later running at RIP {address}",
            record[2],
        ), record[2]
        assert "magic SysRq l and w" in record[3]

        def console() -> str:
            return spinbox.journal("-u", scope, "-t", "spinbox-console", "-o", "cat")

        # The guest kernel answers on its console: the CPU's backtrace (a busy loop of the container's)
        # and the blocked tasks, then its quiet loglevel back.
        spinbox.wait_for("the kernel's backtraces", lambda: "Loglevel set to 4" in console(), timeout=60)
        answer = console()
        print("\n".join(record), answer, sep="\n")
        assert "sysrq: Show backtrace of all active CPUs" in answer
        assert "NMI backtrace for cpu 0" in answer and "Comm: sh" in answer
        assert "sysrq: Show Blocked State" in answer
    finally:
        busctl(spinbox, "--timeout=120", "call", BUS, path, VM_IFACE, "Kill", check=False)
        spinbox.run("rm", "-rf", root)
    assert leftovers(spinbox) == NOTHING
