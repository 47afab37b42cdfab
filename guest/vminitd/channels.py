"""Where the agent listens and where its logs go: virtio-serial ports, vsock, unix sockets.

A virtio-serial port is one byte stream with no connection of its own: it
reads EOF and polls POLLHUP while the host end is not connected. Each time the
host connects is a new session of the agent protocol on the same port.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import select
import struct
from pathlib import Path

from guest.vminitd.stdio import read
from spinbox.ttrpc import Server

log = logging.getLogger(__name__)

AGENT_PORT = "spinbox.agent"
CONTROL_PORT = "spinbox.control"
LOG_PORT = "spinbox.log"
VSOCK_PORT = 1024

_POLL_INTERVAL = 0.05


def find_port(
    name: str, sys_class: Path = Path("/sys/class/virtio-ports"), dev: Path = Path("/dev")
) -> Path | None:
    """The /dev/vportNpM whose virtio-serial port name is `name` (there is no udev to link it)."""
    for entry in sorted(sys_class.glob("vport*")):
        with contextlib.suppress(OSError):
            if (entry / "name").read_text().strip() == name:
                return dev / entry.name
    return None


def host_connected(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLOUT)
    return not any(events & select.POLLHUP for _, events in poller.poll(0))


async def serve_port(server: Server, path: Path) -> None:
    """Serves the agent API on a virtio-serial port, one session per host connection, forever."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            await PortSessions(server, fd).run()
        except Exception:
            log.exception("serving %s failed; starting over", path)
            await asyncio.sleep(_POLL_INTERVAL)
        finally:
            os.close(fd)


_HEADER = struct.Struct(">IIBB")
_REQUEST, _DATA = 1, 3
_MAX_FRAME = 4 << 20
# Bytes 4-9 of a new client's first frame: stream id 1, a request, no flags.
_FIRST_REQUEST = struct.pack(">IBB", 1, _REQUEST, 0)


class PortSessions:
    """Splits a virtio-serial port's one byte stream into ttrpc sessions.

    The port does not say when a host reconnects faster than the guest looks (the
    close and the open both arrive before the reader runs), nor where garbage
    ends. So the frames are checked here: a request whose stream id does not
    increase starts a new session (a new client counts from 1 again), and a
    header no client would send (bad type, odd size, even stream id) ends the
    session; bytes are then dropped up to what looks like a new client's first
    request (stream 1, a request frame, no flags). End of file means the host left,
    but not necessarily the client whose request is being answered: the guest
    driver handles the port's close and open messages apart from its data, so the
    close of one host connection can be seen after the next connection's first
    request was read. End of file therefore drops partial frames, not the session.
    """

    def __init__(self, server: Server, fd: int) -> None:
        self.server = server
        self.fd = fd
        self.buffer = bytearray()
        self.session: _Session | None = None
        self.last_request = 0
        self.resyncing = False

    async def run(self) -> None:
        try:
            while True:
                if self.session is None:
                    await _wait_host(self.fd)
                data = await read(self.fd)
                if not data:  # the host went away, or went away before what was just read
                    # The session stays: the port reports a host's close (and the next
                    # host's open) after the next host's first request may already have
                    # been read, and ending the session would drop that request unanswered.
                    # The next client's first request ends it (stream ids start again).
                    self.buffer.clear()
                    self.resyncing = False
                    await _wait_host(self.fd)
                    continue
                self.buffer += data
                await self._frames()
        finally:
            await self._end("the agent stopped")

    async def _frames(self) -> None:
        while len(self.buffer) >= _HEADER.size:
            if self.resyncing and not self._resync():
                return
            length, stream_id, kind, _ = _HEADER.unpack_from(self.buffer)
            if kind not in (_REQUEST, _DATA) or length > _MAX_FRAME or stream_id % 2 == 0:
                log.warning("garbage on the agent port; dropping bytes up to the next client's first request")
                self.resyncing = True
                await self._end("garbage")
                continue
            if len(self.buffer) < _HEADER.size + length:
                return
            if kind == _REQUEST:
                if stream_id <= self.last_request:
                    await self._end("a new client")
                self.last_request = stream_id
            if self.session is None:
                self.session = _Session(self.server, self.fd)
                await self.session.start()
            frame = bytes(self.buffer[: _HEADER.size + length])
            del self.buffer[: _HEADER.size + length]
            self.session.reader.feed_data(frame)

    def _resync(self) -> bool:
        """Drops bytes before a new client's first request header; False while none is in the buffer."""
        at = self.buffer.find(_FIRST_REQUEST, 4)
        if at < 0:
            # Keep a tail that may be the start of the marker.
            del self.buffer[: max(0, len(self.buffer) - len(_FIRST_REQUEST) - 4)]
            return False
        del self.buffer[: at - 4]
        self.resyncing = False
        return True

    async def _end(self, why: str) -> None:
        session, self.session = self.session, None
        self.last_request = 0
        if session is not None:
            log.debug("agent session ended: %s", why)
            await session.stop()


class _Session:
    """One ttrpc connection over the port: frames are fed in, replies go out on a dup of its fd."""

    def __init__(self, server: Server, fd: int) -> None:
        self.server = server
        self.fd = fd
        self.reader = asyncio.StreamReader(limit=_MAX_FRAME * 2)
        self.task: asyncio.Task[None] | None = None
        self.transport: asyncio.WriteTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        wfile = os.fdopen(os.dup(self.fd), "wb", buffering=0)
        self.transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, wfile)
        writer = asyncio.StreamWriter(self.transport, protocol, self.reader, loop)
        self.task = asyncio.ensure_future(self.server.serve_connection(self.reader, writer))

    async def stop(self) -> None:
        self.reader.feed_eof()
        if self.task is not None:
            try:
                await self.task
            except Exception:
                log.exception("agent session failed")
        if self.transport is not None and self.transport.get_write_buffer_size():
            # Replies still buffered (the host is gone) must not reach the next host.
            self.transport.abort()


_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def priority(level: int) -> int:
    """A logging level as a syslog priority (0-7)."""
    for threshold in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if level >= threshold:
            return _PRIORITY[threshold]
    return 7


class PortLogHandler(logging.Handler):
    """Sends log records to the spinbox.log port as `<N>message` lines.

    emit() only appends to a bounded buffer: logging never blocks PID 1. A task
    on the event loop writes the buffer out while the host is connected; the
    oldest lines go when the buffer is full.
    """

    def __init__(self, capacity: int = 1000) -> None:
        super().__init__()
        self.lines: collections.deque[bytes] = collections.deque(maxlen=capacity)
        self.dropped = 0
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record).replace("\n", "\n ")  # one record, one line
            if len(self.lines) == self.lines.maxlen:
                self.dropped += 1
            self.lines.append(f"<{priority(record.levelno)}>{text}\n".encode(errors="replace"))
            # After the loop ended (PID 1 powering off) the line stays for the console only.
            if self._loop is not None and self._wake is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._wake.set)
        except Exception:
            self.handleError(record)

    async def run(self, path: Path) -> None:
        """Writes buffered lines to the port at `path`, forever."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        pending = b""
        try:
            while True:
                if not pending and not self.lines:
                    self._wake.clear()
                    await self._wake.wait()
                if not host_connected(fd):
                    await asyncio.sleep(0.2)
                    continue
                if self.dropped:
                    self.lines.appendleft(f"<4>dropped {self.dropped} log lines\n".encode())
                    self.dropped = 0
                if not pending:
                    pending = b"".join(self.lines)
                    self.lines.clear()
                try:
                    pending = pending[os.write(fd, pending) :]
                except BlockingIOError:
                    await asyncio.sleep(_POLL_INTERVAL)
                except OSError:
                    await asyncio.sleep(0.2)
        finally:
            os.close(fd)


async def _wait_host(fd: int) -> None:
    """Wait until the port has a host on its other end (nothing signals it: poll)."""
    while not host_connected(fd):  # noqa: ASYNC110 (a port signals no connect)
        await asyncio.sleep(_POLL_INTERVAL)
