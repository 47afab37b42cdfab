"""VM.OpenPortForward over a real (private) system bus: spinboxd's VM object answers
with the listener as a file descriptor, the shim's client takes it over, and the
listener keeps working once spinboxd's copy and connection are gone (a restart).
A failure is a named error with spinboxd's sentence, and passes no descriptor."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from dbusmock import DBusTestCase

from spinbox.busclient import BusClient, SpinboxdError
from spinbox.busnames import BUS_NAME
from spinbox.daemon.auth import Authorizer, SpecHidingBus, record_caller
from spinbox.daemon.errors import Failed
from spinbox.daemon.service import VMInterface
from spinbox.shim.spinboxd import Spinboxd

VM_PATH = "/org/spinstack/Spinbox/vm/a"


@pytest.fixture
def bus_address(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS", raising=False)
    DBusTestCase.start_system_bus()
    address = os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
    try:
        yield address
    finally:
        DBusTestCase.stop_dbus(DBusTestCase.system_bus_pid)  # type: ignore[attr-defined]


class Manager:
    """VmManager.open_port_forward: a real listener, or spinboxd's named failure."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.listeners: list[socket.socket] = []

    async def open_port_forward(self, vm: Any) -> socket.socket:
        if self.fail:
            raise Failed("cannot add the port-forward rule to the network namespace /run/netns/cni-1 of VM a")
        self.listeners.append(socket.create_server(("127.0.0.1", 0)))
        return self.listeners[-1]


async def serve(address: str, manager: Manager) -> SpecHidingBus:
    bus = SpecHidingBus(bus_address=address, negotiate_unix_fd=True)
    await bus.connect()
    vm = SimpleNamespace(id="a", phase="running", state=SimpleNamespace())
    bus.export(VM_PATH, VMInterface(manager, vm, Authorizer(bus)))  # type: ignore[arg-type]
    bus.add_message_handler(record_caller)
    await bus.request_name(BUS_NAME)
    return bus


def test_the_listener_arrives_as_a_file_descriptor_and_outlives_spinboxd(bus_address: str) -> None:
    manager = Manager()

    async def run() -> None:
        service = await serve(bus_address, manager)
        shim = await Spinboxd.connect(bus_address)
        try:
            fd = await shim.open_port_forward(VM_PATH)
        finally:
            shim.close()
        received = socket.socket(fileno=fd)
        with received:
            assert not os.get_inheritable(fd)
            [ours] = manager.listeners
            assert received.getsockname() == ours.getsockname()
            # spinboxd restarts: its copy and its bus connection go, the shim's listener stays.
            ours.close()
            service.disconnect()
            client = socket.create_connection(received.getsockname(), timeout=10)
            received.settimeout(10)
            accepted, _ = received.accept()
            with client, accepted:
                client.sendall(b"ping")
                assert accepted.recv(4) == b"ping"

    asyncio.run(run())


def test_a_failure_is_named_and_passes_no_descriptor(bus_address: str) -> None:
    async def run() -> None:
        service = await serve(bus_address, Manager(fail=True))
        client = await BusClient.connect(bus_address)
        before = set(os.listdir("/proc/self/fd"))
        try:
            with pytest.raises(SpinboxdError) as raised:
                await client.call_fd(VM_PATH, "org.spinstack.Spinbox.VM", "OpenPortForward")
        finally:
            client.close()
            service.disconnect()
        assert raised.value.kind == "Failed"
        assert raised.value.message == (
            "cannot add the port-forward rule to the network namespace /run/netns/cni-1 of VM a"
        )
        assert set(os.listdir("/proc/self/fd")) <= before

    asyncio.run(run())
