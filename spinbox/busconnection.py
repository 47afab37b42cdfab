"""A client's connection to a D-Bus bus over a unix socket (asyncio): the
EXTERNAL authentication with file descriptor passing negotiated, Hello, then
method calls matched to their replies. Signals are dropped; a method call to
this connection is answered UnknownMethod."""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket

from spinbox.buswire import (
    BUS_NAME,
    BUS_PATH,
    CONNECT_TIMEOUT,
    MAX_FDS,
    NO_REPLY_EXPECTED,
    SYSTEM_BUS,
    UNKNOWN_METHOD,
    BusError,
    Message,
    MessageType,
    decode,
    message_size,
    unix_fd_count,
)

_READ = 65536


def socket_path(address: str) -> str:
    """The socket of the first unix transport in a D-Bus address (`unix:path=` or `unix:abstract=`)."""
    for entry in address.split(";"):
        transport, _, options = entry.partition(":")
        if transport != "unix":
            continue
        keys = dict(option.partition("=")[::2] for option in options.split(",") if option)
        if "path" in keys:
            return _unescape(keys["path"])
        if "abstract" in keys:
            return "\0" + _unescape(keys["abstract"])
    raise BusError(f"the D-Bus address {address!r} names no unix socket")


def _unescape(value: str) -> str:
    out, at = bytearray(), 0
    while at < len(value):
        if value[at] == "%":
            out.append(int(value[at + 1 : at + 3], 16))
            at += 3
        else:
            out += value[at].encode()
            at += 1
    return out.decode()


class BusConnection:
    """One connection to the bus; `call` sends a method call and waits for its reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.unique_name = ""
        self.connected = True
        self._serial = 0
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, address: str | None = None, timeout: float = CONNECT_TIMEOUT) -> BusConnection:  # noqa: ASYNC109
        """Connects and authenticates to the bus at `address` (the system bus by default)."""
        address = address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        connection = cls(sock)
        try:
            async with asyncio.timeout(timeout):
                await connection._loop.sock_connect(sock, socket_path(address))
                await _authenticate(sock)
                connection.start()
                reply = await connection.call(
                    Message(destination=BUS_NAME, path=BUS_PATH, interface=BUS_NAME, member="Hello")
                )
        except TimeoutError:
            connection.disconnect()
            raise BusError(f"the bus at {address} did not let this process in within {timeout:g}s") from None
        except BaseException:
            connection.disconnect()
            raise
        if reply.message_type == MessageType.ERROR or reply.signature != "s":
            connection.disconnect()
            raise BusError(f"the bus at {address} refused Hello: {reply.error_name} {reply.body}")
        connection.unique_name = reply.body[0]
        return connection

    def start(self) -> None:
        """Reads the bus's messages from now on (once authenticated)."""
        self._loop.add_reader(self.sock.fileno(), self._readable)

    async def call(self, message: Message) -> Message:
        """The reply (method return or error) to a method call."""
        if not self.connected:
            raise BusError("the connection to the bus is closed")
        self._serial += 1
        message.serial = self._serial
        reply: asyncio.Future[Message] = self._loop.create_future()
        self._pending[message.serial] = reply
        try:
            try:
                await self._loop.sock_sendall(self.sock, message.encode())
            except BaseException as error:
                # Cut off mid-message (cancelled, or the socket broke), the stream is lost.
                self.disconnect(BusError(f"sending {message.member} to the bus failed: {error!r}"))
                raise
            return await reply
        finally:
            self._pending.pop(message.serial, None)

    def disconnect(self, error: BaseException | None = None) -> None:
        if not self.connected:
            return
        self.connected = False
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        reason = error or BusError("the connection to the bus was closed")
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(reason)

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(
                _READ, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.disconnect(BusError(f"the connection to the bus broke: {error}"))
            return
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if not data:
            self.disconnect(BusError("the bus closed the connection"))
            return
        self._buffer += data
        try:
            self._dispatch()
        except BusError as error:
            self.disconnect(error)

    def _dispatch(self) -> None:
        while len(self._buffer) >= 16:
            size = message_size(bytes(self._buffer[:16]))
            if len(self._buffer) < size:
                return
            raw = bytes(self._buffer[:size])
            del self._buffer[:size]
            count = unix_fd_count(raw)
            if count > len(self._fds):
                raise BusError(f"a D-Bus message names {count} file descriptors, {len(self._fds)} came")
            fds, self._fds = self._fds[:count], self._fds[count:]
            try:
                message = decode(raw, fds)
            except BusError:
                for fd in fds:
                    os.close(fd)
                raise
            self._deliver(message)

    def _deliver(self, message: Message) -> None:
        if message.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR):
            reply = self._pending.get(message.reply_serial)
            if reply is not None and not reply.done():
                reply.set_result(message)
                return
        elif message.message_type == MessageType.METHOD_CALL and not message.flags & NO_REPLY_EXPECTED:
            self._answer_unknown(message)
        for fd in message.unix_fds:  # a reply nobody waits for any more, or a signal
            os.close(fd)

    def _answer_unknown(self, call: Message) -> None:
        self._serial += 1
        error = Message(
            message_type=MessageType.ERROR,
            destination=call.sender,
            error_name=UNKNOWN_METHOD,
            reply_serial=call.serial,
            signature="s",
            body=[f"this connection serves no {call.interface}.{call.member}"],
            serial=self._serial,
        )
        data = error.encode()
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as failure:
            self.disconnect(BusError(f"the connection to the bus broke: {failure}"))
            return
        if sent != len(data):  # a full socket buffer: the stream would be cut mid-message
            self.disconnect(BusError("the bus does not take this connection's messages"))


async def _authenticate(sock: socket.socket) -> None:
    """SASL EXTERNAL as this process's uid, with file descriptor passing; then BEGIN."""
    loop = asyncio.get_running_loop()
    uid = str(os.geteuid()).encode().hex().encode()
    await loop.sock_sendall(sock, b"\0AUTH EXTERNAL " + uid + b"\r\n")
    if not (await _line(sock)).startswith(b"OK "):
        raise BusError("the bus refused this process's credentials")
    await loop.sock_sendall(sock, b"NEGOTIATE_UNIX_FD\r\n")
    if await _line(sock) != b"AGREE_UNIX_FD":
        raise BusError("the bus does not pass file descriptors")
    await loop.sock_sendall(sock, b"BEGIN\r\n")


async def _line(sock: socket.socket) -> bytes:
    line = bytearray()
    while not line.endswith(b"\r\n"):
        chunk = await asyncio.get_running_loop().sock_recv(sock, 1)
        if not chunk:
            raise BusError("the bus closed the connection while authenticating")
        line += chunk
        if len(line) > 16384:
            raise BusError("the bus sent an overlong authentication line")
    return bytes(line[:-2])
