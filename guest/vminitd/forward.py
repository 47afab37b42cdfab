"""Port-forward in the guest: the agent's Forward and ForwardInput streams.

Forward connects to 127.0.0.1:port in the VM's network namespace (every
container of the pod shares it), so a server bound to the pod's localhost is
reached as with runc. A refused connection fails the call at once; one that
neither succeeds nor fails within CONNECT_TIMEOUT fails with a sentence naming
the port. The host must attach ForwardInput within CONNECT_TIMEOUT as well, or
the connection is closed: no socket stays open for a host that went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator

from google.protobuf.empty_pb2 import Empty

from spinbox.api.forward import CONNECT_TIMEOUT, ForwardError, Splice
from spinbox.api.proto import agent_pb2 as pb
from spinbox.ttrpc import Code, TtrpcError

log = logging.getLogger(__name__)

# Connections forwarded at once (each holds at most about 1 MiB here: a window each way);
# more are refused. The host bounds its own too.
MAX_CONNECTIONS = 64


class _Connection:
    def __init__(self, splice: Splice) -> None:
        self.splice = splice
        self.attached = asyncio.Event()


class Forwarder:
    """The VM's side of every forwarded connection."""

    def __init__(self, connect_timeout: float = CONNECT_TIMEOUT, host: str = "127.0.0.1") -> None:
        self.connect_timeout = connect_timeout
        self.host = host
        self._ids = itertools.count(1)
        self._connections: dict[int, _Connection] = {}

    async def forward(self, req: pb.ForwardRequest) -> AsyncIterator[pb.ForwardChunk]:
        port = req.port
        if not 0 < port < 65536:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"port-forward to port {port}: not a TCP port")
        if len(self._connections) >= MAX_CONNECTIONS:
            raise TtrpcError(
                Code.RESOURCE_EXHAUSTED,
                f"port-forward to port {port}: {MAX_CONNECTIONS} connections are forwarded already",
            )
        what = f"port-forward to {self.host}:{port} in the VM"
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, port)
        except TimeoutError:
            raise TtrpcError(
                Code.DEADLINE_EXCEEDED, f"{what}: no connection within {self.connect_timeout:g} s"
            ) from None
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise TtrpcError(Code.UNAVAILABLE, f"{what}: {reason}") from None
        splice = Splice(reader, writer, what)
        connection_id = next(self._ids)
        connection = self._connections[connection_id] = _Connection(splice)
        pump: asyncio.Task[None] | None = None
        try:
            yield pb.ForwardChunk(connection=connection_id)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await connection.attached.wait()
            except TimeoutError:
                raise TtrpcError(
                    Code.DEADLINE_EXCEEDED,
                    f"{what}: the host sent no input stream within {self.connect_timeout:g} s",
                ) from None
            pump = asyncio.create_task(splice.pump_local())
            async for message in splice.outgoing():
                yield message
        finally:
            splice.end()
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            self._connections.pop(connection_id, None)

    async def forward_input(self, requests: AsyncIterator[pb.ForwardChunk]) -> Empty:
        first = await anext(requests, None)
        if first is None:
            raise TtrpcError(
                Code.INVALID_ARGUMENT, "ForwardInput needs a first message naming the connection"
            )
        if first.data or first.eof or first.acked:
            raise TtrpcError(Code.INVALID_ARGUMENT, "ForwardInput's first message names the connection only")
        connection = self._connections.get(first.connection)
        if connection is None or connection.attached.is_set():
            raise TtrpcError(Code.NOT_FOUND, f"no port-forward connection {first.connection} awaits input")
        connection.attached.set()
        splice = connection.splice
        try:
            await splice.consume(requests)
        except ForwardError as error:
            log.warning("%s", error)
            raise TtrpcError(Code.INVALID_ARGUMENT, str(error)) from None
        finally:
            # The host ended its stream: whatever is left of the connection goes.
            splice.end()
        return Empty()
