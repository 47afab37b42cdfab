"""Pieces shared by both ends of a connection: the frame writer and the
bounded inbox that holds one stream's messages until its reader takes them."""

from __future__ import annotations

import asyncio
import collections

from spinbox.ttrpc.frame import MAX_MESSAGE, encode_header
from spinbox.ttrpc.status import Code, TtrpcError

# Payloads up to this size are joined to their header in one write.
_JOIN_LIMIT = 64 << 10


class FrameWriter:
    """Writes whole frames; a frame is handed to the transport in one step,
    so frames from concurrent tasks never interleave."""

    def __init__(self, writer: asyncio.StreamWriter, max_message: int = MAX_MESSAGE) -> None:
        self.writer = writer
        self.max_message = max_message

    def check_size(self, payload: bytes, what: str) -> None:
        if len(payload) > self.max_message:
            raise TtrpcError(
                Code.RESOURCE_EXHAUSTED,
                f"{what} of {len(payload)} bytes exceeds the ttrpc message limit of {self.max_message} bytes",
            )

    def write(self, stream_id: int, frame_type: int, flags: int, payload: bytes = b"") -> None:
        """Queue a frame on the transport without waiting (see drain)."""
        if self.writer.is_closing():
            raise ConnectionResetError("ttrpc connection is closed")
        header = encode_header(stream_id, frame_type, flags, len(payload))
        if len(payload) <= _JOIN_LIMIT:
            self.writer.write(header + payload)
        else:
            self.writer.write(header)
            self.writer.write(payload)

    async def drain(self) -> None:
        await self.writer.drain()

    async def send(self, stream_id: int, frame_type: int, flags: int, payload: bytes = b"") -> None:
        self.write(stream_id, frame_type, flags, payload)
        await self.writer.drain()


class Inbox:
    """Payloads received on one stream, at most `limit` of them buffered.

    The connection's reader puts; the stream's consumer gets. The end of the
    stream is a normal end (get returns None) or an error (get raises it).
    """

    def __init__(self, limit: int = 64) -> None:
        self._items: collections.deque[bytes] = collections.deque()
        self._limit = limit
        self._ended = False
        self._error: TtrpcError | None = None
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def full(self) -> bool:
        return len(self._items) >= self._limit

    async def put(self, payload: bytes) -> None:
        """Add a payload, waiting while the inbox is full."""
        while len(self._items) >= self._limit and not self._ended:
            self._writable = asyncio.get_running_loop().create_future()
            try:
                await self._writable
            finally:
                self._writable = None
        if self._ended:
            return
        self._items.append(payload)
        self._wake_reader()

    def put_nowait(self, payload: bytes) -> None:
        """Add a payload even if the inbox is full (a stream's last one)."""
        if not self._ended:
            self._items.append(payload)
            self._wake_reader()

    def end(self, error: TtrpcError | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        self._wake_reader()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def get(self) -> bytes | None:
        """The next payload; None once the stream has ended normally."""
        while not self._items:
            if self._ended:
                if self._error is not None:
                    raise self._error
                return None
            self._readable = asyncio.get_running_loop().create_future()
            try:
                await self._readable
            finally:
                self._readable = None
        payload = self._items.popleft()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        return payload

    def _wake_reader(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)
