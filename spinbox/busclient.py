"""A small client of spinboxd's D-Bus API: one method call with its named
error, and an object's properties. The shim and spinboxctl both speak to
spinboxd through it, over spinbox.busconnection (a caller's part of D-Bus)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

from spinbox.busconnection import BusConnection
from spinbox.busnames import BUS_NAME, ERROR_PREFIX, PROPERTIES_IFACE
from spinbox.buswire import BusError, Message, MessageType, Variant

# A call spinboxd has not answered in this long fails (spinboxd answers
# within its own deadlines; this one is for a spinboxd that hangs).
CALL_TIMEOUT = 120.0


# The bus daemon's error for a call whose recipient left the bus without replying.
NO_REPLY = "org.freedesktop.DBus.Error.NoReply"


class SpinboxdError(Exception):
    """A D-Bus error from spinboxd; `kind` is the last part of its name
    (NotFound, InvalidArgument, AlreadyExists, Failed, ...)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.kind = name.removeprefix(ERROR_PREFIX) if name.startswith(ERROR_PREFIX) else name
        self.message = message


def plain(value: Any) -> Any:
    """A D-Bus value without its Variant wrappers."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


async def connect_bus(bus_address: str | None) -> BusConnection:
    # File descriptors are negotiated: VM.OpenPortForward answers with one.
    try:
        return await BusConnection.connect(bus_address)
    except Exception as error:
        raise SpinboxdError("Unavailable", f"the system bus is not reachable ({error})") from error


async def method_call(
    bus: BusConnection,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str,
    body: Sequence[Any],
    seconds: float,
) -> Message | None:
    """The reply to one method call (None if the bus gave none); TimeoutError if none came in time."""
    message = Message(
        destination=destination,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=list(body),
    )
    # Not asyncio.wait_for: on Python 3.11 it drops a cancellation that comes as the reply
    # does, and a caller past its deadline (a ttrpc call's) would then run on.
    async with asyncio.timeout(seconds):
        return await bus.call(message)


class BusClient:
    """Calls to org.spinstack.Spinbox. A restart of spinboxd keeps the bus
    connection; a lost connection to the bus itself is made again."""

    def __init__(self, bus: BusConnection, bus_address: str | None = None) -> None:
        self.bus = bus
        self.bus_address = bus_address

    @classmethod
    async def connect(cls, bus_address: str | None = None) -> BusClient:
        return cls(await connect_bus(bus_address), bus_address)

    def close(self) -> None:
        self.bus.disconnect()

    async def call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        timeout: float = CALL_TIMEOUT,  # noqa: ASYNC109
    ) -> list[Any]:
        reply = await self.reply(path, interface, member, signature, body, timeout)
        for fd in reply.unix_fds:  # none expected
            os.close(fd)
        return list(reply.body)

    async def call_fd(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        timeout: float = CALL_TIMEOUT,  # noqa: ASYNC109
    ) -> int:
        """A call answering with one file descriptor (D-Bus type h): the fd, now the caller's."""
        reply = await self.reply(path, interface, member, signature, body, timeout)
        fds = list(reply.unix_fds)
        index = reply.body[0] if reply.signature == "h" and reply.body else -1
        if not isinstance(index, int) or not 0 <= index < len(fds):
            for fd in fds:
                os.close(fd)
            what = f"without a file descriptor (signature {reply.signature!r})"
            raise SpinboxdError("Failed", f"spinboxd answered {member} {what}")
        fd = fds.pop(index)
        for other in fds:
            os.close(other)
        os.set_inheritable(fd, False)
        return fd

    async def reply(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        timeout: float = CALL_TIMEOUT,  # noqa: ASYNC109
    ) -> Message:
        """The method return of one call; an error reply or no reply is raised as SpinboxdError."""
        if not self.bus.connected:
            self.bus = await connect_bus(self.bus_address)
        try:
            reply = await method_call(self.bus, BUS_NAME, path, interface, member, signature, body, timeout)
        except BusError as error:
            raise SpinboxdError("Unavailable", f"calling spinboxd's {member}: {error}") from None
        except TimeoutError:
            what = f" for {body[0]}" if body and isinstance(body[0], str) and member != "GetAll" else ""
            raise SpinboxdError(
                "Timeout", f"spinboxd did not answer {member}{what} within {timeout:g}s (object {path})"
            ) from None
        if reply is None:
            raise SpinboxdError("NoReply", f"spinboxd did not answer {member}")
        if reply.message_type == MessageType.ERROR:
            for fd in reply.unix_fds:
                os.close(fd)
            name = str(reply.error_name or "")
            text = str(reply.body[0]) if reply.body else name or "unknown error"
            if name == NO_REPLY:
                # The bus daemon's answer when spinboxd's connection went away mid-call.
                text = (
                    f"spinboxd ended before it answered {member} ({text}); systemd starts it again, "
                    "and the new spinboxd finishes or undoes what the call had begun"
                )
            raise SpinboxdError(name, text)
        return reply

    async def properties(self, path: str, interface: str) -> dict[str, Any]:
        """All properties of `interface` on the object at `path`, as plain values."""
        (values,) = await self.call(path, PROPERTIES_IFACE, "GetAll", "s", [interface])
        return {str(k): plain(v) for k, v in values.items()}
