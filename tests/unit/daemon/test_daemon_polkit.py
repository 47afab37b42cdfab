"""Who reads a VM's spec and changes VMs when not root: polkit decides, faked by python-dbusmock.

A private bus with dbusmock's polkitd template stands in for polkit, whose
answers a test cannot otherwise choose. The caller is taken to be uid 1000
(the private bus only has root's connections).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio.message_bus import MessageBus
from dbusmock import MOCK_IFACE, DBusTestCase

from spinbox.daemon.auth import READ_SPEC_ACTION, Authorizer, SpecGuard, SpecHidingBus, record_caller
from spinbox.daemon.service import PRIVATE, VM_IFACE, VMInterface

VM_PATH = "/org/spinstack/Spinbox/vm/a"
SECRET = "s3cr3t"
PEER = "org.freedesktop.DBus.Peer"


class NonRootCaller(Authorizer):
    async def caller_uid(self, sender: str, what: str) -> int:
        return 1000


@pytest.fixture
def bus_address(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS", raising=False)
    DBusTestCase.start_system_bus()
    address = os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
    try:
        yield address
    finally:
        DBusTestCase.stop_dbus(DBusTestCase.system_bus_pid)  # type: ignore[attr-defined]


@pytest.fixture
def polkit(bus_address: str) -> Iterator[Any]:
    process, authority = DBusTestCase.spawn_server_template("polkitd", {}, stdout=subprocess.DEVNULL)
    try:
        yield authority
    finally:
        process.terminate()
        process.wait()


def vm() -> Any:
    state = SimpleNamespace(
        pid=7,
        scope="spinbox-vm-a.scope",
        agent_address="unix:/run/spinbox/vm/a/agent.sock",
        rootfs_path="/run/rootfs",
        addresses=[],
        resources={"vcpus": 1, "annotations": {"secret": SECRET}},
        timeline={},
        namespace="default",
        container_id="a",
    )
    return SimpleNamespace(id="a", phase="running", state=state)


async def serve(address: str, deadline: float = 10.0) -> MessageBus:
    bus = await MessageBus(bus_address=address).connect()
    authorizer = NonRootCaller(bus, timeout=deadline)
    bus.export(VM_PATH, VMInterface(None, vm(), authorizer))  # type: ignore[arg-type]
    bus.add_message_handler(record_caller)
    bus.add_message_handler(SpecGuard(bus, authorizer, PRIVATE))
    return bus


async def properties(address: str, service: MessageBus, member: str, *body: str) -> Message:
    client = await MessageBus(bus_address=address).connect()
    try:
        reply = await client.call(
            Message(
                destination=service.unique_name,
                path=VM_PATH,
                interface="org.freedesktop.DBus.Properties",
                member=member,
                signature="s" * len(body),
                body=list(body),
            )
        )
        assert reply is not None
        return reply
    finally:
        client.disconnect()


def read_resources(address: str, timeout: float = 10.0) -> tuple[Message, Message]:
    """A Get of Resources and a GetAll of the VM interface, as uid 1000."""

    async def scenario() -> tuple[Message, Message]:
        service = await serve(address, timeout)
        try:
            get = await properties(address, service, "Get", VM_IFACE, "Resources")
            every = await properties(address, service, "GetAll", VM_IFACE)
            return get, every
        finally:
            service.disconnect()

    return asyncio.run(scenario())


def test_polkit_allows_reading_the_spec(bus_address: str, polkit: Any) -> None:
    polkit.SetAllowed([READ_SPEC_ACTION], dbus_interface=MOCK_IFACE)
    get, every = read_resources(bus_address)
    assert get.message_type == MessageType.METHOD_RETURN
    assert get.body[0].value["annotations"].value == {"secret": SECRET}
    assert "Resources" in every.body[0] and "State" in every.body[0]


def test_polkit_denies_reading_the_spec(bus_address: str, polkit: Any) -> None:
    polkit.SetAllowed(["org.spinstack.spinbox.manage"], dbus_interface=MOCK_IFACE)  # another action
    get, every = read_resources(bus_address)
    assert get.error_name == "org.freedesktop.DBus.Error.AccessDenied"
    assert get.body == [f"reading Resources is denied: uid 1000 is not authorized for {READ_SPEC_ACTION}"]
    # GetAll answers with everything else.
    assert every.message_type == MessageType.METHOD_RETURN
    assert "Resources" not in every.body[0] and every.body[0]["State"].value == "running"
    assert SECRET not in repr(every.body)


def test_without_polkit_only_root_reads_the_spec(bus_address: str) -> None:
    get, every = read_resources(bus_address)
    assert get.error_name == "org.freedesktop.DBus.Error.AccessDenied"
    assert "polkit is not available" in get.body[0]
    assert "Resources" not in every.body[0] and "Pid" in every.body[0]


def test_a_polkit_that_does_not_answer_denies_in_time(bus_address: str, polkit: Any) -> None:
    polkit.SetAllowed([READ_SPEC_ACTION], dbus_interface=MOCK_IFACE)
    polkit.SimulateHang(True, dbus_interface=MOCK_IFACE)
    get, _ = read_resources(bus_address, timeout=1)
    assert get.error_name == "org.freedesktop.DBus.Error.AccessDenied"
    assert "did not answer CheckAuthorization within 1 s" in get.body[0]


def test_polkit_decides_state_changes_too(bus_address: str, polkit: Any) -> None:
    async def pause() -> Message:
        service = await serve(bus_address)
        client = await MessageBus(bus_address=bus_address).connect()
        try:
            reply = await client.call(
                Message(destination=service.unique_name, path=VM_PATH, interface=VM_IFACE, member="Pause")
            )
            assert reply is not None
            return reply
        finally:
            client.disconnect()
            service.disconnect()

    polkit.SetAllowed([READ_SPEC_ACTION], dbus_interface=MOCK_IFACE)  # reading is not managing
    reply = asyncio.run(pause())
    assert reply.error_name == "org.freedesktop.DBus.Error.AccessDenied"
    assert "not authorized for org.spinstack.spinbox.manage" in reply.body[0]


def test_the_export_broadcast_leaves_the_spec_out(bus_address: str) -> None:
    async def scenario() -> list[Message]:
        watcher = await MessageBus(bus_address=bus_address).connect()
        seen: list[Message] = []
        watcher.add_message_handler(lambda m: seen.append(m) if m.member == "InterfacesAdded" else None)
        match = "type='signal',interface='org.freedesktop.DBus.ObjectManager',member='InterfacesAdded'"
        await watcher.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[match],
            )
        )
        service = SpecHidingBus(bus_address=bus_address)
        service.private = PRIVATE
        await service.connect()
        service.export(VM_PATH, VMInterface(None, vm(), Authorizer(service)))  # type: ignore[arg-type]
        await watcher.call(Message(destination=service.unique_name, path="/", interface=PEER, member="Ping"))
        service.disconnect()
        watcher.disconnect()
        return seen

    (added,) = asyncio.run(scenario())
    assert added.body[0] == VM_PATH
    assert "Resources" not in added.body[1][VM_IFACE] and "State" in added.body[1][VM_IFACE]
