"""The ttrpc server: routes each request on a connection to its handler,
runs the handlers concurrently, and answers on the request's stream."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

from google.protobuf import symbol_database
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from spinbox.api.proto import ttrpc_pb2
from spinbox.ttrpc.frame import MAX_MESSAGE, Flags, FrameReader, FrameType, OversizedFrame, ProtocolError
from spinbox.ttrpc.status import Code, TtrpcError
from spinbox.ttrpc.stream import FrameWriter, Inbox

log = logging.getLogger("spinbox.ttrpc")

Req = TypeVar("Req", bound=Message)

UnaryHandler = Callable[[Req, "CallContext"], Awaitable[Message]]
ServerStreamHandler = Callable[[Req, "CallContext"], AsyncIterator[Message]]
ClientStreamHandler = Callable[[AsyncIterator[Req], "CallContext"], Awaitable[Message]]


def ok_response(body: bytes) -> bytes:
    """ttrpc.Response{status: {code: OK}, payload: body}, encoded by hand:
    it is built for every successful call."""
    if not body:
        return b"\x0a\x00"
    size = len(body)
    varint = bytearray()
    while size > 0x7F:
        varint.append(size & 0x7F | 0x80)
        size >>= 7
    varint.append(size)
    return b"\x0a\x00\x12" + bytes(varint) + body


def streaming(method: MethodDescriptor) -> tuple[bool, bool]:
    """Whether an rpc streams its requests and its responses."""
    client = getattr(method, "client_streaming", None)
    if client is not None:
        return bool(client), bool(method.server_streaming)
    # protobuf's upb backend (4.21) has no streaming flags on a method: they are in its proto.
    from google.protobuf.descriptor_pb2 import MethodDescriptorProto

    proto = MethodDescriptorProto()
    method.CopyToProto(proto)  # type: ignore[attr-defined]  # there at run time, not in the stubs
    return proto.client_streaming, proto.server_streaming


class CallContext:
    """What a handler knows about the call it serves."""

    # A plain class, not a dataclass: defining a dataclass costs the guest agent's boot.
    __slots__ = ("deadline", "metadata", "method", "service")

    def __init__(
        self,
        service: str,
        method: str,
        metadata: dict[str, list[str]] | None = None,
        deadline: float | None = None,
    ) -> None:
        self.service = service
        self.method = method
        self.metadata: dict[str, list[str]] = {} if metadata is None else metadata
        # Event-loop time (loop.time()) by which the caller wants an answer.
        self.deadline = deadline

    def __repr__(self) -> str:
        return f"CallContext({self.service}/{self.method}, deadline={self.deadline})"

    def first(self, key: str) -> str | None:
        """The first metadata value under key, if any."""
        values = self.metadata.get(key)
        return values[0] if values else None


class _Kind(enum.Enum):
    UNARY = "unary"
    SERVER_STREAM = "server-stream"
    CLIENT_STREAM = "client-stream"


class _Method(NamedTuple):
    kind: _Kind
    request_type: type[Message]
    handler: Callable[..., Any]


class Server:
    """Serves registered methods on any number of connections.

    `max_message` caps a frame's payload; `max_calls` caps the calls in
    flight on one connection (more are refused with RESOURCE_EXHAUSTED);
    `stream_buffer` caps the messages queued for a client-streaming handler
    and `stream_full_timeout` is how long the connection waits for that
    handler to make room before failing the call with RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        *,
        max_message: int = MAX_MESSAGE,
        max_calls: int = 4096,
        stream_buffer: int = 64,
        stream_full_timeout: float = 1.0,
    ) -> None:
        self.max_message = max_message
        self.max_calls = max_calls
        self.stream_buffer = stream_buffer
        self.stream_full_timeout = stream_full_timeout
        self._methods: dict[tuple[str, str], _Method] = {}
        self._connections: set[_ServerConnection] = set()
        # Each listener with the unix socket path to remove when it closes.
        self._listeners: list[tuple[asyncio.Server, str | None]] = []
        self._closing = False

    def _add(self, service: str, method: str, entry: _Method) -> None:
        key = (service, method)
        if key in self._methods:
            raise ValueError(f"{service}/{method} is already registered")
        self._methods[key] = entry

    def add_unary(
        self, service: str, method: str, request_type: type[Req], handler: UnaryHandler[Req]
    ) -> None:
        self._add(service, method, _Method(_Kind.UNARY, request_type, handler))

    def add_server_stream(
        self, service: str, method: str, request_type: type[Req], handler: ServerStreamHandler[Req]
    ) -> None:
        self._add(service, method, _Method(_Kind.SERVER_STREAM, request_type, handler))

    def add_client_stream(
        self, service: str, method: str, request_type: type[Req], handler: ClientStreamHandler[Req]
    ) -> None:
        self._add(service, method, _Method(_Kind.CLIENT_STREAM, request_type, handler))

    def add_service(
        self, service: ServiceDescriptor, implementation: object, name: str | None = None
    ) -> None:
        """Register every method of a protobuf service that implementation
        has an attribute for (same name as the rpc; the kind of handler
        follows the rpc's streaming). `name` serves it under another service
        name with the same messages (containerd.task.v3.Task for v2's)."""
        registry = symbol_database.Default()
        service_name = name or service.full_name
        for method in service.methods:
            handler = getattr(implementation, method.name, None)
            if handler is None:
                continue
            request_type = registry.GetSymbol(method.input_type.full_name)
            client_streaming, server_streaming = streaming(method)
            if client_streaming and server_streaming:
                raise ValueError(
                    f"{service.full_name}/{method.name}: bidirectional streams are not supported"
                )
            if client_streaming:
                kind = _Kind.CLIENT_STREAM
            elif server_streaming:
                kind = _Kind.SERVER_STREAM
            else:
                kind = _Kind.UNARY
            self._add(service_name, method.name, _Method(kind, request_type, handler))

    def lookup(self, service: str, method: str) -> _Method:
        entry = self._methods.get((service, method))
        if entry is None:
            if not any(s == service for s, _ in self._methods):
                raise TtrpcError(Code.UNIMPLEMENTED, f"unknown service {service}")
            raise TtrpcError(Code.UNIMPLEMENTED, f"unknown method {method} of service {service}")
        return entry

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection; returns when the peer closes it, it breaks,
        or the server closes."""
        if self._closing:
            writer.close()
            return
        conn = _ServerConnection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    async def serve_unix(self, path: str | os.PathLike[str]) -> asyncio.Server:
        """Listen on a unix socket at path (a stale socket there is replaced)."""
        server = await asyncio.start_unix_server(self.serve_connection, path=os.fspath(path))
        self._listeners.append((server, os.fspath(path)))
        return server

    async def serve_socket(self, sock: socket.socket) -> asyncio.Server:
        """Serve on a listening stream socket of any family (unix, vsock, an
        inherited fd such as the shim's fd 3)."""
        sock.setblocking(False)
        server = await asyncio.start_server(self.serve_connection, sock=sock)
        self._listeners.append((server, None))
        return server

    async def serve_vsock(self, port: int, cid: int = socket.VMADDR_CID_ANY) -> asyncio.Server:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind((cid, port))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return await self.serve_socket(sock)

    async def close(self) -> None:
        """Stop listening, end every connection (cancelling the handlers of
        calls still in flight) and wait until they are gone."""
        self._closing = True
        listeners, self._listeners = self._listeners, []
        for server, _ in listeners:
            server.close()
        conns = list(self._connections)
        for conn in conns:
            conn.abort()
        await asyncio.gather(*(conn.finished.wait() for conn in conns))
        for server, path in listeners:
            await server.wait_closed()
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)


class _ServerConnection:
    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._server = server
        self._frames = FrameReader(reader, server.max_message)
        self._out = FrameWriter(writer, server.max_message)
        self._writer = writer
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._inboxes: dict[int, Inbox] = {}
        self._last_stream_id = 0
        self._reader: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()

    def abort(self) -> None:
        if self._reader is not None:
            self._reader.cancel()

    async def run(self) -> None:
        self._reader = asyncio.create_task(self._read_loop())
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._reader)
        finally:
            self._reader.cancel()
            try:
                await self._shutdown()
            finally:
                self.finished.set()

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self._frames.read()
                if frame is None:
                    return
                if isinstance(frame, OversizedFrame):
                    await self._oversized(frame)
                elif frame.type is FrameType.REQUEST:
                    await self._request(frame.stream_id, frame.flags, frame.payload)
                elif frame.type is FrameType.DATA:
                    await self._data(frame.stream_id, frame.flags, frame.payload)
                else:
                    raise ProtocolError(f"client sent a {frame.type.name.lower()} frame")
        except ProtocolError as e:
            log.warning("ttrpc: closing connection: %s", e)
        except (ConnectionError, OSError) as e:
            log.debug("ttrpc: connection lost: %s", e)

    async def _shutdown(self) -> None:
        tasks = list(self._calls.values())
        for task in tasks:
            task.cancel()
        for inbox in self._inboxes.values():
            inbox.end(TtrpcError(Code.CANCELLED, "connection closed"))
        await asyncio.gather(*tasks, return_exceptions=True)
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def _answer(self, stream_id: int, error: TtrpcError) -> None:
        response = ttrpc_pb2.Response(status=error.to_status())
        await self._out.send(stream_id, FrameType.RESPONSE, 0, response.SerializeToString())

    async def _oversized(self, frame: OversizedFrame) -> None:
        error = TtrpcError(
            Code.RESOURCE_EXHAUSTED,
            f"message of {frame.length} bytes exceeds the ttrpc limit of {self._server.max_message} bytes",
        )
        log.warning(
            "ttrpc: dropped a %s frame on stream %d: %s", frame.type.name.lower(), frame.stream_id, error
        )
        if frame.type is FrameType.REQUEST and frame.stream_id % 2 == 1:
            self._last_stream_id = max(self._last_stream_id, frame.stream_id)
            await self._answer(frame.stream_id, error)
        elif frame.type is FrameType.DATA:
            self._fail_stream(frame.stream_id, error)

    async def _request(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id % 2 == 0:
            await self._answer(stream_id, TtrpcError(Code.INVALID_ARGUMENT, "client stream ids must be odd"))
            return
        if stream_id <= self._last_stream_id:
            await self._answer(stream_id, TtrpcError(Code.INVALID_ARGUMENT, "stream ids must increase"))
            return
        self._last_stream_id = stream_id
        try:
            request = ttrpc_pb2.Request.FromString(payload)
        except DecodeError as e:
            await self._answer(stream_id, TtrpcError(Code.INVALID_ARGUMENT, f"undecodable request: {e}"))
            return
        try:
            method = self._server.lookup(request.service, request.method)
            if len(self._calls) >= self._server.max_calls:
                raise TtrpcError(
                    Code.RESOURCE_EXHAUSTED,
                    f"more than {self._server.max_calls} calls in flight on one connection",
                )
        except TtrpcError as e:
            await self._answer(stream_id, e)
            return
        metadata: dict[str, list[str]] = {}
        for kv in request.metadata:
            metadata.setdefault(kv.key, []).append(kv.value)
        deadline = None
        if request.timeout_nano > 0:
            deadline = asyncio.get_running_loop().time() + request.timeout_nano / 1e9
        ctx = CallContext(request.service, request.method, metadata, deadline)
        inbox = None
        if method.kind is _Kind.CLIENT_STREAM:
            inbox = Inbox(self._server.stream_buffer)
            if request.payload:
                await inbox.put(request.payload)
            if flags & Flags.REMOTE_CLOSED:
                inbox.end()
            self._inboxes[stream_id] = inbox
        task = asyncio.create_task(self._run_call(stream_id, method, ctx, request.payload, inbox))
        self._calls[stream_id] = task
        task.add_done_callback(lambda _: self._forget(stream_id))

    def _forget(self, stream_id: int) -> None:
        self._calls.pop(stream_id, None)
        inbox = self._inboxes.pop(stream_id, None)
        if inbox is not None:
            inbox.end(TtrpcError(Code.CANCELLED, "call finished"))

    async def _data(self, stream_id: int, flags: int, payload: bytes) -> None:
        inbox = self._inboxes.get(stream_id)
        if inbox is None:
            # The call may have just finished; late data for it is harmless.
            log.debug("ttrpc: dropped data for inactive stream %d", stream_id)
            return
        if not flags & Flags.NO_DATA:
            try:
                if inbox.full:
                    async with asyncio.timeout(self._server.stream_full_timeout):
                        await inbox.put(payload)
                else:
                    inbox.put_nowait(payload)
            except TimeoutError:
                self._fail_stream(
                    stream_id,
                    TtrpcError(Code.RESOURCE_EXHAUSTED, "stream handler is not keeping up with its input"),
                )
                return
        if flags & Flags.REMOTE_CLOSED:
            inbox.end()
            self._inboxes.pop(stream_id, None)

    def _fail_stream(self, stream_id: int, error: TtrpcError) -> None:
        inbox = self._inboxes.pop(stream_id, None)
        if inbox is not None:
            inbox.end(error)

    async def _run_call(
        self, stream_id: int, method: _Method, ctx: CallContext, payload: bytes, inbox: Inbox | None
    ) -> None:
        out = self._out
        try:
            if ctx.deadline is None:
                response = await self._invoke(stream_id, method, ctx, payload, inbox)
            else:
                try:
                    async with asyncio.timeout_at(ctx.deadline) as scope:
                        response = await self._invoke(stream_id, method, ctx, payload, inbox)
                except TimeoutError:
                    if not scope.expired():
                        raise
                    raise TtrpcError(
                        Code.DEADLINE_EXCEEDED, f"{ctx.service}/{ctx.method}: deadline exceeded"
                    ) from None
            if method.kind is _Kind.SERVER_STREAM:
                await out.send(stream_id, FrameType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA)
                return
            assert response is not None
            body = response.SerializeToString()
            out.check_size(body, "response")
            await out.send(stream_id, FrameType.RESPONSE, 0, ok_response(body))
            return
        except TtrpcError as e:
            error = e
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the connection is going away
            # The handler let a cancellation of its own escape: still answer.
            error = TtrpcError(Code.CANCELLED, f"{ctx.service}/{ctx.method} was cancelled")
        except (ConnectionError, OSError) as e:
            if self._writer.is_closing():
                return
            log.exception("ttrpc: %s/%s failed", ctx.service, ctx.method)
            error = TtrpcError(Code.INTERNAL, str(e) or type(e).__name__)
        except Exception as e:
            log.exception("ttrpc: %s/%s failed", ctx.service, ctx.method)
            error = TtrpcError(Code.INTERNAL, str(e) or type(e).__name__)
        with contextlib.suppress(ConnectionError, OSError):
            await self._answer(stream_id, error)

    async def _invoke(
        self, stream_id: int, method: _Method, ctx: CallContext, payload: bytes, inbox: Inbox | None
    ) -> Message | None:
        if inbox is not None:
            return await method.handler(_requests(inbox, method.request_type), ctx)  # type: ignore[no-any-return]
        request = _decode(method.request_type, payload)
        if method.kind is _Kind.UNARY:
            return await method.handler(request, ctx)  # type: ignore[no-any-return]
        messages = method.handler(request, ctx)
        try:
            async for message in messages:
                body = message.SerializeToString()
                self._out.check_size(body, "stream message")
                await self._out.send(stream_id, FrameType.DATA, 0, body)
        finally:
            aclose = getattr(messages, "aclose", None)
            if aclose is not None:
                await aclose()
        return None


def _decode(message_type: type[Req], payload: bytes) -> Req:
    try:
        return message_type.FromString(payload)
    except DecodeError as e:
        raise TtrpcError(
            Code.INVALID_ARGUMENT, f"undecodable {message_type.DESCRIPTOR.full_name}: {e}"
        ) from None


async def _requests(inbox: Inbox, message_type: type[Req]) -> AsyncIterator[Req]:
    while (payload := await inbox.get()) is not None:
        yield _decode(message_type, payload)
