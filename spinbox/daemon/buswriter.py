"""Messages spinboxd sends, every string's length counted in bytes as D-Bus requires.

Debian 12's dbus_fast (1.84) writes a string's length in characters. A message carrying text
beyond ASCII (an error naming what a caller sent, a pod's annotations in Resources) would be
malformed, and the bus answers a malformed message by disconnecting its sender: one call from
anyone would take spinboxd off the bus. Such a message is marshalled by spinbox.buswire; every
other keeps dbus_fast's own marshalling.

The same writer sends its queued messages in the order they were queued: 1.84's takes the
newest first whenever the socket was not writable at once (fixed in later dbus_fast), which
would, for one, announce a VM's states in reverse.
"""

from __future__ import annotations

from collections import deque
from copy import copy
from typing import Any

from dbus_fast import Message, Variant
from dbus_fast.aio.message_bus import _MessageWriter
from dbus_fast.constants import ErrorType

from spinbox import buswire


def has_wide_text(value: Any) -> bool:
    """Whether a value holds a string that UTF-8 spells in more bytes than characters."""
    if isinstance(value, str):
        return not value.isascii()
    if isinstance(value, Variant):
        return has_wide_text(value.value)
    if isinstance(value, dict):
        return any(has_wide_text(k) or has_wide_text(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_wide_text(item) for item in value)
    return False


def _wire_value(value: Any) -> Any:
    if isinstance(value, Variant):
        return buswire.Variant(value.signature, _wire_value(value.value))
    if isinstance(value, dict):
        return {k: _wire_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wire_value(item) for item in value]
    return value


def _error_name(msg: Message) -> str:
    name = msg.error_name
    return str(name.value) if isinstance(name, ErrorType) else name or ""


def encode(msg: Message, negotiate_unix_fd: bool) -> bytes:
    """The message on the wire: dbus_fast's marshalling unless it carries text beyond ASCII."""
    header = (msg.path, msg.interface, msg.member, msg.error_name, msg.destination)
    if not has_wide_text(header) and not has_wide_text(msg.body):
        return bytes(msg._marshall(negotiate_unix_fd))
    wire = buswire.Message(
        path=msg.path or "",
        interface=msg.interface or "",
        member=msg.member or "",
        destination=msg.destination or "",
        signature=msg.signature or "",
        body=[_wire_value(value) for value in msg.body],
        message_type=buswire.MessageType(msg.message_type.value),
        error_name=_error_name(msg),
        reply_serial=msg.reply_serial or 0,
        serial=msg.serial,
        flags=int(msg.flags.value),
        unix_fds=msg.unix_fds if negotiate_unix_fd else (),
    )
    return wire.encode()


class _InOrder(deque[Any]):
    """A queue whose pop(), which dbus_fast's writer takes the next message with, is the oldest."""

    def pop(self, *_: int) -> Any:
        return self.popleft()


class BusWriter(_MessageWriter):
    """dbus_fast's writer for a MessageBus, marshalling through `encode`, in queue order."""

    def __init__(self, bus: Any) -> None:
        super().__init__(bus)
        self.messages = _InOrder()

    def buffer_message(self, msg: Message, future: Any = None) -> None:
        self.messages.append((encode(msg, self.negotiate_unix_fd), copy(msg.unix_fds), future))
