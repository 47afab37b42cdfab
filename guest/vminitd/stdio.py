"""Non-blocking file descriptors on the event loop: process output and input."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator

CHUNK = 64 * 1024


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _wait(fd: int, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    if writable:
        loop.add_writer(fd, _resolve, ready)
    else:
        loop.add_reader(fd, _resolve, ready)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def read(fd: int, size: int = CHUNK) -> bytes:
    """Reads what is there (at least one byte), or b"" at end of file.

    A pty master reads EIO once the last slave is closed: that is its end of file.
    """
    os.set_blocking(fd, False)
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            await _wait(fd, writable=False)
        except OSError as e:
            if e.errno == errno.EIO:
                return b""
            raise


async def write_all(fd: int, data: bytes) -> None:
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await _wait(fd, writable=True)


class Busy(Exception):
    """Another reader is attached to this output."""


class OutputPipe:
    """A process's stdout or stderr (or pty master), read only while a reader is attached.

    While nobody reads, the pipe fills and the process blocks: nothing is lost.
    A chunk read but not taken by a reader that went away goes to the next one.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._pending = b""
        self._lock = asyncio.Lock()
        self._wake: asyncio.Future[None] | None = None
        self.eof = False
        self.closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._lock.locked():
            raise Busy("another reader is attached to this output")
        async with self._lock:
            try:
                while not self.eof and not self.closed:
                    if not self._pending:
                        data = await self._read()
                        if not data:
                            self.eof = True
                            return
                        self._pending = data
                    yield self._pending
                    self._pending = b""
            finally:
                if self.closed:
                    os.close(self.fd)

    async def _read(self) -> bytes:
        loop = asyncio.get_running_loop()
        while not self.closed:
            try:
                return os.read(self.fd, CHUNK)
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno == errno.EIO:
                    return b""
                raise
            wake: asyncio.Future[None] = loop.create_future()
            self._wake = wake
            loop.add_reader(self.fd, _resolve, wake)
            try:
                await wake
            finally:
                loop.remove_reader(self.fd)
                self._wake = None
        return b""

    def close(self) -> None:
        """Closes the output; an attached reader sees its end and closes the fd itself."""
        if self.closed:
            return
        self.closed = True
        if self._lock.locked():
            if self._wake is not None and not self._wake.done():
                self._wake.set_result(None)
        else:
            os.close(self.fd)


class InputPipe:
    """A process's stdin. Writes are serialized; close() after the last write."""

    def __init__(self, fd: int, terminal: bool = False) -> None:
        self.fd = fd
        self.terminal = terminal
        self._lock = asyncio.Lock()
        self.closed = False

    async def write(self, data: bytes) -> None:
        async with self._lock:
            if self.closed:
                raise BrokenPipeError(errno.EPIPE, "stdin is closed")
            await write_all(self.fd, data)

    async def close(self) -> None:
        async with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.terminal:
                # The pty master stays open for output; end of input is the EOF character.
                try:
                    await write_all(self.fd, b"\x04")
                finally:
                    os.close(self.fd)
            else:
                os.close(self.fd)
