"""spinboxd's messages are valid whatever text they carry: one with a string beyond ASCII is
written with its lengths in bytes (dbus_fast 1.84 counts characters) and reads back whole with
dbus_fast's own reader; every other is dbus_fast's own marshalling, byte for byte. Queued
messages go out in order. The daemon
staying on a real bus after such a reply is in
tests/integration/daemon/test_spinboxd_service.py."""

from __future__ import annotations

import asyncio
import io
import socket
from typing import Any

import dbus_fast
from dbus_fast._private.unmarshaller import Unmarshaller
from hypothesis import given, settings
from hypothesis import strategies as st

from spinbox import buswire
from spinbox.daemon.buswriter import BusWriter, encode, has_wide_text

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)


def read_back(data: bytes) -> dbus_fast.Message:
    reader = Unmarshaller(io.BytesIO(data))
    reader.unmarshall()
    assert reader.message is not None
    return reader.message


def test_ascii_messages_are_dbus_fasts_own_bytes() -> None:
    signal = dbus_fast.Message.new_signal(
        "/org/spinstack/Spinbox/vm/a", "org.freedesktop.DBus.Properties", "PropertiesChanged",
        "sa{sv}as", ["org.spinstack.Spinbox.VM", {"State": dbus_fast.Variant("s", "running")}, []],
    )  # fmt: skip
    signal.serial = 12
    assert encode(signal, True) == bytes(signal._marshall(True))


def test_an_error_naming_text_beyond_ascii_reads_back_whole() -> None:
    call = dbus_fast.Message(path="/org/spinstack/Spinbox", member="GetVM", serial=4, sender=":1.9")
    error = dbus_fast.Message.new_error(call, "org.spinstack.Spinbox.Error.InvalidArgs", "VM id 'vm-é' 🙂")
    error.serial = 30
    data = encode(error, True)
    read = read_back(data)
    assert read.message_type == dbus_fast.MessageType.ERROR
    assert (read.error_name, read.reply_serial, read.serial, read.destination) == (
        "org.spinstack.Spinbox.Error.InvalidArgs",
        4,
        30,
        ":1.9",
    )
    assert read.body == ["VM id 'vm-é' 🙂"]
    assert buswire.decode(data).body == ["VM id 'vm-é' 🙂"]


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(TEXT, TEXT, max_size=4),
    st.lists(TEXT, max_size=3),
    TEXT,
    st.integers(0, 2**32 - 1),
)
def test_any_text_in_nested_values_reads_back_whole(
    annotations: dict[str, str], names: list[str], text: str, number: int
) -> None:
    body: list[Any] = [
        text,
        {"annotations": dbus_fast.Variant("a{ss}", annotations), "vcpus": dbus_fast.Variant("u", number)},
        [[name, dbus_fast.Variant("as", names)] for name in names],
    ]
    reply = dbus_fast.Message(
        message_type=dbus_fast.MessageType.METHOD_RETURN, reply_serial=7, destination=":1.3",
        signature="sa{sv}a(sv)", body=body, serial=8,
    )  # fmt: skip
    read = read_back(encode(reply, False))
    assert read.signature == "sa{sv}a(sv)"
    assert read.body == body
    wide = has_wide_text([text, annotations, names])
    assert wide == any(not s.isascii() for s in [text, *annotations, *annotations.values(), *names])


def test_file_descriptors_are_counted_in_the_header_when_negotiated() -> None:
    call = dbus_fast.Message(path="/vm", member="OpenPortForward", serial=2, sender=":1.4")
    reply = dbus_fast.Message.new_method_return(call, "hs", [0, "écoute"])
    reply.unix_fds = [5]
    reply.serial = 3
    assert buswire.unix_fd_count(encode(reply, True)) == 1
    assert buswire.unix_fd_count(encode(reply, False)) == 0
    assert buswire.decode(encode(reply, True), [5]).body == [0, "écoute"]


class _Bus:
    """What dbus_fast's writer reads of its MessageBus."""

    def __init__(self, sock: socket.socket) -> None:
        self._negotiate_unix_fd = True
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.new_event_loop()
        self._user_disconnect = False
        self.unique_name = ":1.1"
        self.finalized: list[Exception | None] = []

    def _finalize(self, error: Exception | None = None) -> None:
        self.finalized.append(error)


def test_queued_messages_go_out_in_the_order_they_were_queued() -> None:
    ours, theirs = socket.socketpair()
    bus = _Bus(ours)
    try:
        writer = BusWriter(bus)
        for serial in (1, 2, 3):
            signal = dbus_fast.Message.new_signal(
                "/vm", "org.spinstack.Spinbox.VM", "State", "s", [f"é{serial}"]
            )
            signal.serial = serial
            writer.buffer_message(signal)  # queued: the socket was not tried
        writer.write_callback(remove_writer=False)
        data = theirs.recv(65536)
        serials = []
        while data:
            size = buswire.message_size(data[:16])
            serials.append(buswire.decode(data[:size]).serial)
            data = data[size:]
        assert serials == [1, 2, 3]
        assert bus.finalized == []
    finally:
        bus._loop.close()
        ours.close()
        theirs.close()
