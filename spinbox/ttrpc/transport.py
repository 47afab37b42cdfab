"""asyncio streams over file descriptors that are not plain sockets:
character devices such as a virtio-serial port."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import stat
from typing import Any


class _WriteProtocol(asyncio.streams.FlowControlMixin, asyncio.Protocol):
    """Flow control for a StreamWriter over a write-only pipe transport;
    closing the writer closes the read side too, as with a socket."""

    def __init__(self, read_transport: asyncio.BaseTransport) -> None:
        super().__init__()
        self._read_transport = read_transport
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._read_transport.close()
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: Any) -> asyncio.Future[None]:
        return self._closed


async def open_fd_streams(fd: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A reader and writer over a connected socket, pipe-like or character
    device fd. They use duplicates of fd: closing them leaves fd open."""
    loop = asyncio.get_running_loop()
    mode = os.fstat(fd).st_mode
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=os.dup(fd))
        sock.setblocking(False)
        return await asyncio.open_connection(sock=sock)
    reader = asyncio.StreamReader(loop=loop)
    read_file = os.fdopen(os.dup(fd), "rb", buffering=0)
    write_file = os.fdopen(os.dup(fd), "wb", buffering=0)
    try:
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), read_file
        )
    except BaseException:
        read_file.close()
        write_file.close()
        raise
    try:
        transport, protocol = await loop.connect_write_pipe(
            lambda: _WriteProtocol(read_transport), write_file
        )
    except BaseException:
        read_transport.close()
        write_file.close()
        raise
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def host_connected(fd: int) -> bool:
    """Whether a virtio-serial port has a host on its other end.

    While no host is connected the port polls as hung up (and reads return
    end-of-file), and nothing signals a connect: callers poll this.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLOUT)
    events = 0
    for _, mask in poller.poll(0):
        events |= mask
    return bool(events) and not events & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
