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
import socket
from pathlib import Path

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
            await _wait_for_host(fd)
            log.debug("host connected to %s", path)
            await _session(server, fd)
            log.debug("host left %s", path)
        except Exception:
            log.exception("the session on %s failed; waiting for the next one", path)
            await asyncio.sleep(_POLL_INTERVAL)
        finally:
            os.close(fd)


async def _wait_for_host(fd: int) -> None:
    while True:
        if host_connected(fd):
            return
        await asyncio.sleep(_POLL_INTERVAL)


async def _session(server: Server, fd: int) -> None:
    """One agent session over the port's fd, until the host goes away (end of file)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=8 << 20)
    protocol = asyncio.StreamReaderProtocol(reader)
    rfile = os.fdopen(os.dup(fd), "rb", buffering=0)
    wfile = os.fdopen(os.dup(fd), "wb", buffering=0)
    rtransport, _ = await loop.connect_read_pipe(lambda: protocol, rfile)
    wtransport, wprotocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, wfile)
    writer = asyncio.StreamWriter(wtransport, wprotocol, reader, loop)
    try:
        await server.serve_connection(reader, writer)
    finally:
        rtransport.close()
        wtransport.close()


async def serve_vsock(server: Server, port: int) -> asyncio.AbstractServer:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(16)
    sock.setblocking(False)
    listener: asyncio.AbstractServer = await server.serve_socket(sock)
    return listener


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
            if self._loop is not None and self._wake is not None:
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
