"""What a VM exposes, through spinboxd in a real systemd: a confined QEMU, a spec only root reads,
and systemd's signals taken from systemd alone."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.systemd import PrivateSystemd
from tests.integration.daemon.spinboxd import (
    BUS,
    MANAGER_IFACE,
    MANAGER_PATH,
    PYTHON,
    VM_IFACE,
    busctl,
    get_property,
    installed,
    leftovers,
)

NOTHING: dict[str, object] = {"scopes": [], "qemu": [], "files": [], "netns": []}
NOBODY = 65534
SECRET = "s3cr3t-annotation-value"

# From a connection of its own: the next jobs' JobRemoved with result "failed",
# sent to spinboxd directly before the jobs exist (as a racing local process would).
SPOOF_JOBS = """
import asyncio, sys
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio.message_bus import MessageBus

async def step(what, call):
    # Each step has a deadline of its own, to name the one that hangs.
    print(what, file=sys.stderr, flush=True)
    return await asyncio.wait_for(call, 60)

async def main():
    bus = await step("connect", MessageBus(bus_type=BusType.SYSTEM).connect())
    owner = await step("GetNameOwner", bus.call(Message(destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus", interface="org.freedesktop.DBus", member="GetNameOwner",
        signature="s", body=["org.spinstack.Spinbox"])))
    job = await step("StartUnit", bus.call(Message(destination="org.freedesktop.systemd1",
        path="/org/freedesktop/systemd1", interface="org.freedesktop.systemd1.Manager",
        member="StartUnit", signature="ss", body=["basic.target", "replace"])))
    first = int(job.body[0].rsplit("/", 1)[1]) + 1
    for number in range(first, first + 200):
        path = f"/org/freedesktop/systemd1/job/{number}"
        bus.send(Message.new_signal("/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
            "JobRemoved", "uoss", [number, path, "spoofed.scope", "failed"]))
        spoof = Message(message_type=MessageType.SIGNAL, destination=owner.body[0],
            path="/org/freedesktop/systemd1",
            interface="org.freedesktop.systemd1.Manager", member="JobRemoved", signature="uoss",
            body=[number, path, "spoofed.scope", "failed"])
        bus.send(spoof)
        if number % 25 == 0:
            # dbus-fast (1.84) takes a full socket (EAGAIN) for a lost connection:
            # let the bus read what was sent every few dozen signals.
            await step("GetId", bus.call(Message(destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus", interface="org.freedesktop.DBus", member="GetId")))
    # Once the bus answers, everything sent before has been delivered.
    await step("GetId", bus.call(Message(destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus", interface="org.freedesktop.DBus", member="GetId")))
    print(first, first + 199)

asyncio.run(main())
"""

# As nobody: the first InterfacesAdded spinboxd broadcasts, as JSON of property names and values.
WATCH_ADDED = """
import asyncio, json, sys
from dbus_fast import BusType
from dbus_fast.aio.message_bus import MessageBus
from dbus_fast import Message

async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    seen = asyncio.Event()
    def on(msg):
        if msg.member == "InterfacesAdded":
            body = {k: {name: repr(v.value) for name, v in p.items()} for k, p in msg.body[1].items()}
            print(json.dumps(body), flush=True)
            seen.set()
    bus.add_message_handler(on)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
        body=["type='signal',sender='org.spinstack.Spinbox',member='InterfacesAdded'"]))
    print("watching", flush=True)
    await asyncio.wait_for(seen.wait(), 600)

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def spinbox(systemd: PrivateSystemd, guest_image: Path) -> Iterator[PrivateSystemd]:
    with installed(systemd, config=f'[vm]\ninitrd = "{guest_image}"\n'):
        systemd.systemctl("start", "spinbox.service")
        yield systemd
        assert leftovers(systemd) == NOTHING


def as_nobody(*argv: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def status_of(spinbox: PrivateSystemd, pid: int) -> dict[str, str]:
    lines = spinbox.path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_a_running_vm_is_confined_and_its_spec_is_roots(spinbox: PrivateSystemd) -> None:
    watcher = spinbox.popen(*as_nobody(str(PYTHON), "-c", WATCH_ADDED), stdout=subprocess.PIPE)
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == b"watching"
        spoofed = spinbox.run(str(PYTHON), "-c", SPOOF_JOBS, timeout=300).stdout.split()
        assert len(spoofed) == 2
        # Without the sender check, the create would find its scope's job "failed" already.
        call = ("call", BUS, MANAGER_PATH, MANAGER_IFACE, "CreateVM", "sa{sv}", "conf-a", "1")
        # busctl's own deadline first: a boot takes minutes on a loaded machine under TCG.
        args = ("busctl", "--no-pager", "--timeout=300", *call, "annotations", "a{ss}", "1", "secret", SECRET)
        created = spinbox.run(*args, timeout=330)
        path = created.stdout.strip().removeprefix("o ").strip('"')
        try:
            assert get_property(spinbox, path, VM_IFACE, "State") == "running"

            # QEMU: not root, seccomp on, no capabilities.
            pid = get_property(spinbox, path, VM_IFACE, "Pid")
            assert isinstance(pid, int)
            status = status_of(spinbox, pid)
            assert status["Uid"].split()[0] != "0" and status["Gid"].split()[0] != "0"
            assert status["Seccomp"] == "2"
            assert int(status["CapEff"], 16) == 0

            # Resources carries the annotations: root reads it, nobody is denied.
            resources = busctl(spinbox, "--json=short", "get-property", BUS, path, VM_IFACE, "Resources")
            assert SECRET in resources.stdout
            denied = busctl(
                spinbox, "get-property", BUS, path, VM_IFACE, "Resources", user=NOBODY, check=False
            )
            assert denied.returncode != 0
            assert "Access denied" in denied.stderr
            # GetAll answers nobody without it; the rest is public.
            every = busctl(
                spinbox, "--json=short", "call", BUS, path, "org.freedesktop.DBus.Properties",
                "GetAll", "s", VM_IFACE, user=NOBODY,
            )  # fmt: skip
            public = json.loads(every.stdout)["data"][0]
            assert "Resources" not in public and public["State"]["data"] == "running"
            assert SECRET not in every.stdout
            managed = busctl(
                spinbox, "call", BUS, "/", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects",
                user=NOBODY, check=False,
            )  # fmt: skip
            assert managed.returncode != 0 and SECRET not in managed.stdout
            assert get_property(spinbox, path, VM_IFACE, "State") == "running"
        finally:
            busctl(spinbox, "--timeout=120", "call", BUS, path, VM_IFACE, "Stop", "t", "30000")
    finally:
        output, _ = watcher.communicate(timeout=60)
    # The export was broadcast to nobody too, without Resources.
    (added,) = [json.loads(line) for line in output.decode().splitlines()]
    assert "Resources" not in added[VM_IFACE] and "State" in added[VM_IFACE]
    assert SECRET not in output.decode()
    assert leftovers(spinbox) == NOTHING
