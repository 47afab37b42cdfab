"""One port-forwarded TCP connection as both ends of the agent's Forward and
ForwardInput streams carry it (spinbox/api/proto/agent.proto).

The host (the shim) and the guest (vminitd) each hold a local socket: the
client's connection on the host, the connection to 127.0.0.1:port in the VM.
A Splice copies that socket's bytes into ForwardChunk messages and the other
side's messages into the socket, with a window per direction: a side sends a
data chunk only while fewer than WINDOW of its chunks are unacknowledged, and
acknowledges the other side's chunks once they are written to its socket. The
connection's ttrpc streams share one agent channel, so a slow reader on either
end holds back its own connection and never the channel's other calls. The
other side is not trusted to keep to the window: a chunk beyond it, a chunk
larger than CHUNK or data after its eof is a ForwardError.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterable, AsyncIterator

from spinbox.api.proto import agent_pb2 as pb

CHUNK = 32 << 10
WINDOW = 16
# How long the guest may take to connect to the port, and the host to attach
# the input stream of a connection the guest opened.
CONNECT_TIMEOUT = 10.0


class ForwardError(Exception):
    """The other side broke the forwarding protocol; the sentence says how."""


class Splice:
    """Copies between a local socket and the messages of the other side."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        what: str,
        window: int = WINDOW,
        chunk: int = CHUNK,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.what = what  # names the connection in errors
        self.window = window
        self.chunk = chunk
        # Outgoing messages; None ends the stream. At most `window` data chunks,
        # one eof and one ack-only message are ever queued.
        self._out: collections.deque[pb.ForwardChunk | None] = collections.deque()
        self._out_ready = asyncio.Event()
        self._credit = window  # data chunks this side may still send
        self._credit_ready = asyncio.Event()
        self._credit_ready.set()
        self._to_ack = 0  # the other side's chunks written here, not yet acknowledged
        self._ack_queued = False
        self._in_flight = 0  # the other side's chunks received and not yet acknowledged
        self.sent_eof = False
        self.got_eof = False
        self.ended = False

    @property
    def done(self) -> bool:
        """Both sides said eof: the connection ended cleanly."""
        return self.sent_eof and self.got_eof

    def _put(self, message: pb.ForwardChunk | None) -> None:
        self._out.append(message)
        self._out_ready.set()

    def end(self) -> None:
        """Ends the outgoing stream (after what is queued) and closes the local socket."""
        if not self.ended:
            self.ended = True
            self._put(None)
        self._credit_ready.set()
        with contextlib.suppress(Exception):
            self.writer.close()

    async def outgoing(self) -> AsyncIterator[pb.ForwardChunk]:
        """The messages to send, until the connection ends."""
        while True:
            while not self._out:
                self._out_ready.clear()
                await self._out_ready.wait()
            message = self._out.popleft()
            if message is None:
                return
            if not (message.data or message.eof) and self._to_ack == 0:
                continue  # an ack-only message whose acks went out with an earlier one
            if self._to_ack:
                message.acked = self._to_ack
                self._in_flight -= self._to_ack
                self._to_ack = 0
                self._ack_queued = False
            yield message

    async def pump_local(self) -> None:
        """The local socket's bytes out, as the window allows, then eof."""
        try:
            while not self.ended:
                while self._credit <= 0 and not self.ended:
                    self._credit_ready.clear()
                    await self._credit_ready.wait()
                if self.ended:
                    return
                data = await self.reader.read(self.chunk)
                if not data:
                    break
                self._credit -= 1
                self._put(pb.ForwardChunk(data=data))
        except (ConnectionError, OSError):
            pass  # a reset local socket ends its data as end of file does
        if not self.ended:
            self.sent_eof = True
            self._put(pb.ForwardChunk(eof=True))
            if self.done:
                self.end()

    async def consume(self, incoming: AsyncIterable[pb.ForwardChunk]) -> None:
        """The other side's messages into the local socket, until its stream ends."""
        async for message in incoming:
            self.take(message)
            if message.data:
                try:
                    self.writer.write(message.data)
                    await self.writer.drain()
                except (ConnectionError, OSError):
                    # The local socket is gone: end the connection, as a closed reader would.
                    self.end()
                    return
                self._to_ack += 1
                if not self._ack_queued:
                    self._ack_queued = True
                    self._put(pb.ForwardChunk())
            if message.eof:
                with contextlib.suppress(ConnectionError, OSError):
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                if self.done:
                    self.end()

    def take(self, message: pb.ForwardChunk) -> None:
        """Checks a message of the other side and counts its acks and data."""
        if message.acked:
            if self._credit + message.acked > self.window:
                raise ForwardError(f"{self.what}: the other side acknowledged data that was never sent")
            self._credit += message.acked
            self._credit_ready.set()
        if message.data:
            if self.got_eof:
                raise ForwardError(f"{self.what}: the other side sent data after its end of file")
            if len(message.data) > self.chunk:
                raise ForwardError(
                    f"{self.what}: the other side sent a chunk of {len(message.data)} bytes"
                    f" (at most {self.chunk})"
                )
            self._in_flight += 1
            if self._in_flight > self.window:
                raise ForwardError(
                    f"{self.what}: the other side sent more than {self.window} unacknowledged chunks"
                )
        if message.eof:
            self.got_eof = True
