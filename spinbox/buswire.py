"""D-Bus's wire format, and the client side of a bus connection: method calls
and their replies (file descriptors included), nothing else.

The shim and spinboxctl only call spinboxd's methods. dbus_fast, which
spinboxd serves with, costs every shim about 3 MiB (its compiled modules,
introspection, the service side); this is the part of the protocol a caller
needs. Every message read is checked against the specification's limits and
its signature before a value is taken from it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import Any

MAX_MESSAGE = 128 * 1024 * 1024  # the specification's limit on a whole message
MAX_ARRAY = 64 * 1024 * 1024
MAX_DEPTH = 64
MAX_FDS = 16  # received with one message: spinboxd sends at most one
CONNECT_TIMEOUT = 30.0
SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
BUS_NAME = "org.freedesktop.DBus"
BUS_PATH = "/org/freedesktop/DBus"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"

_FIXED = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I", "x": "q", "t": "Q", "d": "d", "h": "I"}
_ALIGN = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4}
_ALIGN.update({"s": 4, "o": 4, "g": 1, "a": 4, "(": 8, "{": 8, "v": 1})


class BusError(Exception):
    """A bus that cannot be reached or spoke against the protocol."""


class MessageType(enum.IntEnum):
    METHOD_CALL = 1
    METHOD_RETURN = 2
    ERROR = 3
    SIGNAL = 4


class Field(enum.IntEnum):
    PATH = 1
    INTERFACE = 2
    MEMBER = 3
    ERROR_NAME = 4
    REPLY_SERIAL = 5
    DESTINATION = 6
    SENDER = 7
    SIGNATURE = 8
    UNIX_FDS = 9


_FIELD_TYPES = {Field.PATH: "o", Field.REPLY_SERIAL: "u", Field.SIGNATURE: "g", Field.UNIX_FDS: "u"}
NO_REPLY_EXPECTED = 0x1


class Variant:
    """A value with its D-Bus type (signature of one complete type)."""

    __slots__ = ("signature", "value")

    def __init__(self, signature: str, value: Any) -> None:
        if split_signature(signature) != [signature]:
            raise ValueError(f"a variant holds one complete type, not {signature!r}")
        self.signature = signature
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Variant) and (self.signature, self.value) == (other.signature, other.value)

    def __hash__(self) -> int:
        return hash(self.signature)

    def __repr__(self) -> str:
        return f"Variant({self.signature!r}, {self.value!r})"


def _type_end(signature: str, start: int, depth: int = 0) -> int:
    """The index just past the complete type that begins at `start`."""
    if depth > MAX_DEPTH:
        raise BusError(f"signature {signature!r} nests too deep")
    if start >= len(signature):
        raise BusError(f"signature {signature!r} ends inside a type")
    code = signature[start]
    if code in _FIXED or code in "sogv":
        return start + 1
    if code == "a":
        return _type_end(signature, start + 1, depth + 1)
    if code == "(":
        end = start + 1
        while end < len(signature) and signature[end] != ")":
            end = _type_end(signature, end, depth + 1)
        if end >= len(signature) or end == start + 1:
            raise BusError(f"signature {signature!r} has an unclosed or empty struct")
        return end + 1
    if code == "{" and start > 0 and signature[start - 1] == "a":
        if start + 1 >= len(signature) or signature[start + 1] not in _FIXED.keys() | set("sog"):
            raise BusError(f"signature {signature!r} has a dict entry whose key is not a basic type")
        end = _type_end(signature, _type_end(signature, start + 1, depth + 1), depth + 1)
        if end >= len(signature) or signature[end] != "}":
            raise BusError(f"signature {signature!r} has a dict entry of other than two types")
        return end + 1
    raise BusError(f"signature {signature!r} has an unknown type code {code!r}")


def split_signature(signature: str) -> list[str]:
    """The complete types of a signature, in order."""
    types, at = [], 0
    while at < len(signature):
        end = _type_end(signature, at)
        types.append(signature[at:end])
        at = end
    return types


class _Writer:
    def __init__(self) -> None:
        self.data = bytearray()

    def align(self, n: int) -> None:
        self.data += bytes(-len(self.data) % n)

    def write(self, signature: str, value: Any) -> None:
        code = signature[0]
        self.align(_ALIGN[code])
        if code in _FIXED:
            self.data += struct.pack("<" + _FIXED[code], value)
        elif code in "so":
            encoded = str(value).encode()
            self.data += struct.pack("<I", len(encoded)) + encoded + b"\0"
        elif code == "g":
            encoded = str(value).encode()
            self.data += bytes([len(encoded)]) + encoded + b"\0"
        elif code == "v":
            if not isinstance(value, Variant):
                raise TypeError(f"a D-Bus variant must be a Variant, not {type(value).__name__}")
            self.write("g", value.signature)
            self.write(value.signature, value.value)
        elif code == "(":
            self.align(8)
            for member, item in zip(split_signature(signature[1:-1]), value, strict=True):
                self.write(member, item)
        elif code == "a":
            self._write_array(signature[1:], value)
        else:
            raise TypeError(f"cannot write D-Bus type {signature!r}")

    def _write_array(self, element: str, value: Any) -> None:
        length_at = len(self.data)
        self.data += bytes(4)
        self.align(_ALIGN[element[0]])
        start = len(self.data)
        if element[0] == "{":
            key, item = split_signature(element[1:-1])
            for k, v in value.items():
                self.align(8)
                self.write(key, k)
                self.write(item, v)
        else:
            for item in value:
                self.write(element, item)
        self.data[length_at : length_at + 4] = struct.pack("<I", len(self.data) - start)


class _Reader:
    """Values out of a message's bytes, each read checked against its bounds."""

    def __init__(self, data: bytes, little: bool, fds: int = 0) -> None:
        self.data = data
        self.at = 0
        self.order = "<" if little else ">"
        self.fds = fds

    def _take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise BusError("a D-Bus message ends inside a value")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def align(self, n: int) -> None:
        pad = -self.at % n
        if any(self._take(pad)):
            raise BusError("a D-Bus message has non-zero padding")

    def _text(self, size: int) -> str:
        raw = self._take(size + 1)
        if raw[-1] != 0 or 0 in raw[:-1]:
            raise BusError("a D-Bus string is not terminated by its only NUL")
        try:
            return raw[:-1].decode()
        except UnicodeDecodeError:
            raise BusError("a D-Bus string is not UTF-8") from None

    def read(self, signature: str, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise BusError("a D-Bus value nests too deep")
        code = signature[0]
        self.align(_ALIGN[code])
        if code in _FIXED:
            fmt = self.order + _FIXED[code]
            (value,) = struct.unpack(fmt, self._take(struct.calcsize(fmt)))
            if code == "b":
                if value > 1:
                    raise BusError(f"a D-Bus boolean is {value}")
                return bool(value)
            if code == "h" and value >= self.fds:
                raise BusError(f"a D-Bus message names file descriptor {value} of {self.fds}")
            return value
        if code in "so":
            (size,) = struct.unpack(self.order + "I", self._take(4))
            return self._text(size)
        if code == "g":
            return self._text(self._take(1)[0])
        if code == "v":
            inner = self.read("g", depth)
            if len(split_signature(inner)) != 1:
                raise BusError(f"a D-Bus variant has the signature {inner!r}")
            return Variant(inner, self.read(inner, depth + 1))
        if code == "(":
            return [self.read(member, depth + 1) for member in split_signature(signature[1:-1])]
        if code == "a":
            return self._read_array(signature[1:], depth)
        raise BusError(f"cannot read D-Bus type {signature!r}")

    def _read_array(self, element: str, depth: int) -> Any:
        (size,) = struct.unpack(self.order + "I", self._take(4))
        if size > MAX_ARRAY:
            raise BusError(f"a D-Bus array of {size} bytes is over the limit")
        self.align(_ALIGN[element[0]])
        end = self.at + size
        if end > len(self.data):
            raise BusError("a D-Bus message ends inside an array")
        if element == "y":  # bytes, as dbus_fast gives them
            return self._take(size)
        if element[0] == "{":
            key, item = split_signature(element[1:-1])
            entries = {}
            while self.at < end:
                self.align(8)
                name = self.read(key, depth + 1)  # before the value: the order on the wire
                entries[name] = self.read(item, depth + 1)
            result: Any = entries
        else:
            result = []
            while self.at < end:
                result.append(self.read(element, depth + 1))
        if self.at != end:
            raise BusError("a D-Bus array's elements overrun its length")
        return result


class Message:
    """One D-Bus message; `body` holds the values of `signature`."""

    def __init__(
        self,
        path: str = "",
        interface: str = "",
        member: str = "",
        destination: str = "",
        signature: str = "",
        body: Sequence[Any] = (),
        message_type: MessageType = MessageType.METHOD_CALL,
        error_name: str = "",
        reply_serial: int = 0,
        serial: int = 0,
        flags: int = 0,
        sender: str = "",
        unix_fds: Sequence[int] = (),
    ) -> None:
        self.path = path
        self.interface = interface
        self.member = member
        self.destination = destination
        self.signature = signature
        self.body = list(body)
        self.message_type = message_type
        self.error_name = error_name
        self.reply_serial = reply_serial
        self.serial = serial
        self.flags = flags
        self.sender = sender
        self.unix_fds = list(unix_fds)

    def encode(self) -> bytes:
        """The message in little-endian wire format; its file descriptors, counted in the
        header, go beside it on the socket."""
        fields: list[list[Any]] = []
        values = {
            Field.PATH: self.path,
            Field.INTERFACE: self.interface,
            Field.MEMBER: self.member,
            Field.ERROR_NAME: self.error_name,
            Field.REPLY_SERIAL: self.reply_serial,
            Field.DESTINATION: self.destination,
            Field.SIGNATURE: self.signature,
            Field.UNIX_FDS: len(self.unix_fds),
        }
        for field, value in values.items():
            if value:
                fields.append([int(field), Variant(_FIELD_TYPES.get(field, "s"), value)])
        body = _Writer()
        for signature, value in zip(split_signature(self.signature), self.body, strict=True):
            body.write(signature, value)
        header = _Writer()
        header.data += struct.pack(
            "<cBBBII", b"l", self.message_type, self.flags, 1, len(body.data), self.serial
        )
        header.write("a(yv)", fields)
        header.align(8)
        return bytes(header.data + body.data)


def message_size(head: bytes) -> int:
    """The whole size of the message whose first 16 bytes are `head`."""
    if head[0:1] not in (b"l", b"B") or head[3] != 1:
        raise BusError("the bus sent something that is not a D-Bus message")
    order = "<" if head[0:1] == b"l" else ">"
    body, fields = struct.unpack(order + "I4xI", head[4:16])
    size = int(16 + fields + (-(16 + fields) % 8) + body)
    if size > MAX_MESSAGE:
        raise BusError(f"the bus sent a message of {size} bytes, over the limit")
    return size


def _header(data: bytes, fds: int) -> tuple[_Reader, dict[Field, Any]]:
    """A whole message's header fields (those the specification names), and a reader at its body."""
    reader = _Reader(data, little=data[0:1] == b"l", fds=fds)
    reader.at = 12
    fields: dict[Field, Any] = {}
    known = set(Field.__members__.values())
    for code, value in reader.read("a(yv)"):
        if code in known:
            expected = _FIELD_TYPES.get(Field(code), "s")
            if value.signature != expected:
                raise BusError(f"the D-Bus header field {code} is of type {value.signature!r}")
            fields[Field(code)] = value.value
    reader.align(8)
    return reader, fields


def unix_fd_count(data: bytes) -> int:
    """How many file descriptors a whole message says came with it."""
    return int(_header(data, 0)[1].get(Field.UNIX_FDS, 0))


def decode(data: bytes, fds: Sequence[int] = ()) -> Message:
    """One whole message (message_size bytes) and the file descriptors that came with it."""
    reader, fields = _header(data, len(fds))
    message_type, flags = data[1], data[2]
    (serial,) = struct.unpack(reader.order + "I", data[8:12])
    if message_type not in set(MessageType.__members__.values()):
        raise BusError(f"the bus sent a message of unknown type {message_type}")
    if fields.get(Field.UNIX_FDS, 0) != len(fds):
        count = fields.get(Field.UNIX_FDS, 0)
        raise BusError(f"a D-Bus message came with {len(fds)} file descriptors, not its {count}")
    signature = str(fields.get(Field.SIGNATURE, ""))
    body = [reader.read(t) for t in split_signature(signature)]
    if reader.at != len(data):
        raise BusError("a D-Bus message's body is longer than its values")
    return Message(
        path=str(fields.get(Field.PATH, "")),
        interface=str(fields.get(Field.INTERFACE, "")),
        member=str(fields.get(Field.MEMBER, "")),
        destination=str(fields.get(Field.DESTINATION, "")),
        signature=signature,
        body=body,
        message_type=MessageType(message_type),
        error_name=str(fields.get(Field.ERROR_NAME, "")),
        reply_serial=int(fields.get(Field.REPLY_SERIAL, 0)),
        serial=serial,
        flags=flags,
        sender=str(fields.get(Field.SENDER, "")),
        unix_fds=fds,
    )
