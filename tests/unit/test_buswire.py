"""spinbox.buswire and spinbox.busconnection, the caller's side of D-Bus the shim
and spinboxctl use: messages read and written exactly as dbus_fast (spinboxd's
library) reads and writes them, malformed ones refused with a named error, and
a bus that does not answer failing its deadline. Calls through a real bus
daemon, file descriptors included, are in tests/unit/daemon/test_daemon_portforward_bus.py."""

from __future__ import annotations

import asyncio
import io
import socket
import struct
from pathlib import Path
from typing import Any

import dbus_fast
import pytest
from dbus_fast._private.unmarshaller import Unmarshaller
from hypothesis import given, settings
from hypothesis import strategies as st

from spinbox import buswire
from spinbox.busclient import BusClient, SpinboxdError
from spinbox.busconnection import BusConnection, socket_path
from spinbox.buswire import BusError, Message, MessageType, Variant, decode, message_size, split_signature

BASIC = {
    "y": st.integers(0, 2**8 - 1),
    "b": st.booleans(),
    "n": st.integers(-(2**15), 2**15 - 1),
    "q": st.integers(0, 2**16 - 1),
    "i": st.integers(-(2**31), 2**31 - 1),
    "u": st.integers(0, 2**32 - 1),
    "x": st.integers(-(2**63), 2**63 - 1),
    "t": st.integers(0, 2**64 - 1),
    "d": st.floats(allow_nan=False),
    # ASCII: dbus_fast 1.84 writes a non-ASCII string's length in characters, not bytes (see below).
    "s": st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=20),
    "o": st.sampled_from(["/", "/org/spinstack/Spinbox", "/org/spinstack/Spinbox/vm/default_2dc1"]),
    "g": st.sampled_from(["", "s", "a{sv}", "(sbb)"]),
}
KEYS = sorted(set(BASIC) - {"d"})
MANAGER = "org.spinstack.Spinbox.Manager"


def signatures() -> st.SearchStrategy[str]:
    def containers(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            inner.map(lambda t: "a" + t),
            st.tuples(st.sampled_from(KEYS), inner).map(lambda kv: "a{" + kv[0] + kv[1] + "}"),
            st.lists(inner, min_size=1, max_size=3).map(lambda ts: "(" + "".join(ts) + ")"),
        )

    return st.recursive(st.sampled_from([*BASIC, "v"]), containers, max_leaves=6)


def values(signature: str) -> st.SearchStrategy[Any]:
    code = signature[0]
    if code in BASIC:
        return BASIC[code]
    if code == "v":
        return st.sampled_from(["u", "s", "as", "a{sv}"]).flatmap(
            lambda t: values(t).map(lambda v: Variant(t, v))
        )
    if code == "(":
        return st.tuples(*(values(t) for t in split_signature(signature[1:-1]))).map(list)
    if signature == "ay":
        return st.binary(max_size=8)
    if signature.startswith("a{"):
        key, item = split_signature(signature[2:-1])
        return st.dictionaries(values(key), values(item), max_size=3)
    return st.lists(values(signature[1:]), max_size=3)


def bodies() -> st.SearchStrategy[tuple[str, list[Any]]]:
    return st.lists(signatures(), max_size=3).flatmap(
        lambda ts: st.tuples(st.just("".join(ts)), st.tuples(*(values(t) for t in ts)).map(list))
    )


def to_fast(value: Any) -> Any:
    """A value with dbus_fast's Variants in place of spinbox.buswire's."""
    if isinstance(value, Variant):
        return dbus_fast.Variant(value.signature, to_fast(value.value))
    if isinstance(value, dict):
        return {k: to_fast(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_fast(v) for v in value]
    return value


def from_fast(value: Any) -> Any:
    if isinstance(value, dbus_fast.Variant):
        return Variant(value.signature, from_fast(value.value))
    if isinstance(value, dict):
        return {k: from_fast(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_fast(v) for v in value]
    return value


@settings(max_examples=300, deadline=None)
@given(bodies())
def test_a_call_is_written_as_dbus_fast_writes_it_and_reads_back(body: tuple[str, list[Any]]) -> None:
    signature, values_ = body
    call = {"destination": "org.spinstack.Spinbox", "path": "/org/spinstack/Spinbox", "member": "CreateVM"}
    ours = Message(**call, interface=MANAGER, signature=signature, body=values_, serial=3).encode()
    fast = dbus_fast.Message(**call, interface=MANAGER, signature=signature, body=to_fast(values_), serial=3)
    assert ours == bytes(fast._marshall(False))
    read = Unmarshaller(io.BytesIO(ours))
    read.unmarshall()
    assert read.message is not None and from_fast(read.message.body) == values_
    assert decode(ours).body == values_


@settings(max_examples=300, deadline=None)
@given(bodies())
def test_a_reply_dbus_fast_writes_is_read_whole(body: tuple[str, list[Any]]) -> None:
    signature, values_ = body
    reply = dbus_fast.Message(
        message_type=dbus_fast.MessageType.METHOD_RETURN, reply_serial=9, destination=":1.7",
        signature=signature, body=to_fast(values_), serial=41,
    )  # fmt: skip
    data = bytes(reply._marshall(False))
    assert message_size(data[:16]) == len(data)
    message = decode(data)
    assert (message.message_type, message.reply_serial, message.serial) == (MessageType.METHOD_RETURN, 9, 41)
    assert (message.signature, message.body) == (signature, values_)


def test_an_error_and_its_file_descriptors_are_read() -> None:
    error = dbus_fast.Message(
        message_type=dbus_fast.MessageType.ERROR, error_name="org.spinstack.Spinbox.Error.Failed",
        reply_serial=2, signature="s", body=["cannot"], serial=5,
    )  # fmt: skip
    message = decode(bytes(error._marshall(False)))
    assert (message.message_type, message.error_name, message.body) == (
        MessageType.ERROR,
        error.error_name,
        ["cannot"],
    )
    with_fd = dbus_fast.Message(
        message_type=dbus_fast.MessageType.METHOD_RETURN, reply_serial=3, signature="h", body=[0],
        unix_fds=[1], serial=6,
    )  # fmt: skip
    data = bytes(with_fd._marshall(True))
    assert buswire.unix_fd_count(data) == 1
    assert decode(data, [99]).unix_fds == [99]
    with pytest.raises(BusError, match="came with 0 file descriptors, not its 1"):
        decode(data, [])


def test_a_string_s_length_is_its_utf8_bytes() -> None:
    """As the specification says; dbus_fast 1.84's compiled writer gives 1 for "\x80" (2 bytes)."""
    data = Message(path="/", member="M", signature="s", body=["é\x80"], serial=3).encode()
    assert data.endswith(struct.pack("<I", 4) + "é\x80".encode() + b"\0")
    assert decode(data).body == ["é\x80"]


def test_a_big_endian_message_is_read() -> None:
    fields = b"\x05\x01u\x00" + struct.pack(">I", 4) + b"\x08\x01g\x00\x01u\x00"
    header = b"B\x02\x00\x01" + struct.pack(">III", 4, 8, len(fields)) + fields
    data = header + bytes(-len(header) % 8) + struct.pack(">I", 1234)
    message = decode(data)
    assert (message.reply_serial, message.body) == (4, [1234])


def reply_with(signature: str, body: bytes) -> bytes:
    """A METHOD_RETURN whose body is given as raw bytes."""
    fields = b"\x05\x01u\x00" + struct.pack("<I", 1) + b"\x08\x01g\x00" + bytes([len(signature)])
    fields += signature.encode() + b"\x00"
    header = b"l\x02\x00\x01" + struct.pack("<III", len(body), 1, len(fields)) + fields
    return header + bytes(-len(header) % 8) + body


@pytest.mark.parametrize(
    ("signature", "body", "error"),
    [
        ("s", struct.pack("<I", 5) + b"abc", "ends inside a value"),
        ("s", struct.pack("<I", 3) + b"abcd", "not terminated by its only NUL"),
        ("s", struct.pack("<I", 2) + b"\xff\xfe\x00", "not UTF-8"),
        ("b", struct.pack("<I", 2), "boolean is 2"),
        ("h", struct.pack("<I", 0), "names file descriptor 0 of 0"),
        ("yu", b"\x01\x01\x00\x00" + struct.pack("<I", 1), "non-zero padding"),
        ("au", struct.pack("<I", 2**30), "over the limit"),
        ("au", struct.pack("<I", 6) + bytes(8), "overrun its length"),
        ("v", b"\x02ss\x00", "variant has the signature 'ss'"),
        ("u", struct.pack("<II", 1, 2), "longer than its values"),
        ("a{vs}", struct.pack("<I", 0) + bytes(4), "key is not a basic type"),
        ("(", b"", "unclosed or empty struct"),
        ("z", b"", "unknown type code 'z'"),
    ],
)
def test_a_malformed_message_is_refused_with_its_fault(signature: str, body: bytes, error: str) -> None:
    with pytest.raises(BusError, match=error):
        decode(reply_with(signature, body))


def test_a_message_over_the_limit_is_refused_from_its_first_bytes() -> None:
    head = b"l\x02\x00\x01" + struct.pack("<III", 2**27, 1, 8)
    with pytest.raises(BusError, match="over the limit"):
        message_size(head)
    with pytest.raises(BusError, match="not a D-Bus message"):
        message_size(b"GET / HTTP/1.1\r\n")


def test_a_variant_holds_one_type_and_a_value_of_it() -> None:
    with pytest.raises(ValueError, match="one complete type"):
        Variant("ss", "x")
    with pytest.raises(TypeError, match="must be a Variant"):
        Message(signature="v", body=["plain"]).encode()


def test_bus_addresses() -> None:
    assert socket_path("unix:path=/run/dbus/system_bus_socket") == "/run/dbus/system_bus_socket"
    assert socket_path("tcp:host=x;unix:abstract=/tmp/dbus-%41b,guid=1") == "\0/tmp/dbus-Ab"
    with pytest.raises(BusError, match="names no unix socket"):
        socket_path("tcp:host=localhost,port=1")


def silent_bus(path: Path) -> socket.socket:
    """A unix socket that takes connections and never says a word."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    return server


def test_a_bus_that_never_answers_fails_the_connect_within_its_deadline(tmp_path: Path) -> None:
    with silent_bus(tmp_path / "bus"):

        async def connect() -> None:
            await BusConnection.connect(f"unix:path={tmp_path}/bus", timeout=0.5)

        with pytest.raises(BusError, match=r"did not let this process in within 0.5s"):
            asyncio.run(connect())


def test_garbage_from_the_bus_fails_the_waiting_call_and_closes_the_connection() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        connection = BusConnection(ours)
        connection.start()
        call = asyncio.create_task(connection.call(Message(path="/", member="Ping", destination="x.y")))
        await asyncio.sleep(0.05)
        theirs.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        with pytest.raises(BusError, match="not a D-Bus message"):
            await asyncio.wait_for(call, 5)
        assert not connection.connected
        theirs.close()

    asyncio.run(scenario())


def test_a_call_to_the_connection_is_answered_unknown_method_and_a_signal_dropped() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        connection = BusConnection(ours)
        connection.start()
        signal = dbus_fast.Message(
            message_type=dbus_fast.MessageType.SIGNAL, path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="NameAcquired", signature="s", body=[":1.9"], serial=1,
        )  # fmt: skip
        call = dbus_fast.Message(
            path="/", interface="org.freedesktop.DBus.Peer", member="Ping", sender=":1.3", serial=2
        )
        theirs.sendall(bytes(signal._marshall(False)) + bytes(call._marshall(False)))
        theirs.settimeout(5)
        answer = await asyncio.get_running_loop().run_in_executor(None, theirs.recv, 4096)
        error = decode(answer)
        assert (error.message_type, error.error_name, error.reply_serial) == (
            MessageType.ERROR, buswire.UNKNOWN_METHOD, 2,
        )  # fmt: skip
        assert connection.connected
        connection.disconnect()
        theirs.close()

    asyncio.run(scenario())


def test_a_bus_that_goes_away_fails_the_call_as_spinboxd_unavailable() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        connection = BusConnection(ours)
        connection.start()
        client = BusClient(connection)
        call = asyncio.create_task(
            client.call("/org/spinstack/Spinbox", "org.spinstack.Spinbox.Manager", "ListVMs")
        )
        await asyncio.sleep(0.05)
        assert decode(theirs.recv(4096)).member == "ListVMs"
        theirs.close()
        with pytest.raises(SpinboxdError) as raised:
            await asyncio.wait_for(call, 5)
        assert raised.value.kind == "Unavailable"
        assert raised.value.message == "calling spinboxd's ListVMs: the bus closed the connection"

    asyncio.run(scenario())
