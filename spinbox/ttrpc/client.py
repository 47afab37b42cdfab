"""The ttrpc client: many calls in flight on one connection, each on its own
odd-numbered stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict, TypeVar, Unpack

from google.protobuf.message import DecodeError, Message

from spinbox.api.proto import ttrpc_pb2
from spinbox.ttrpc.frame import MAX_MESSAGE, Flags, FrameReader, FrameType, OversizedFrame, ProtocolError
from spinbox.ttrpc.status import Code, TtrpcError
from spinbox.ttrpc.stream import FrameWriter, Inbox

log = logging.getLogger("spinbox.ttrpc")

Resp = TypeVar("Resp", bound=Message)
Metadata = Mapping[str, str | Sequence[str]]

_MAX_STREAM_ID = (1 << 32) - 1


class CallOptions(TypedDict, total=False):
    """What every kind of call may be given besides its request."""

    timeout: float | None  # seconds; also sent to the server as the call's deadline
    metadata: Metadata | None


@dataclass(eq=False)
class _Call:
    """A call waiting for its response (and, for a server stream, its messages)."""

    response: asyncio.Future[ttrpc_pb2.Response]
    inbox: Inbox | None = None
    # A unary call's test of a response on its stream: one it refuses is dropped, and the call waits on.
    accept: Callable[[ttrpc_pb2.Response], bool] | None = None


class Client:
    """A ttrpc client over asyncio streams (any stream transport).

    Calls may run concurrently from many tasks. A call that is cancelled, or
    whose timeout expires, stops waiting at once; ttrpc has no cancel frame, so
    the server learns of it only through the request's deadline.
    `stream_buffer` caps the messages buffered per server stream: when a
    consumer falls behind, the connection stops reading until it catches up.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_message: int = MAX_MESSAGE,
        stream_buffer: int = 64,
    ) -> None:
        self._frames = FrameReader(reader, max_message)
        self._out = FrameWriter(writer, max_message)
        self._writer = writer
        self._stream_buffer = stream_buffer
        self._next_id = 1
        self._calls: dict[int, _Call] = {}
        self._closed: TtrpcError | None = None
        self._reader_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str], **kwargs: int) -> Client:
        reader, writer = await asyncio.open_unix_connection(os.fspath(path))
        return cls(reader, writer, **kwargs)

    @classmethod
    async def connect_socket(cls, sock: socket.socket, **kwargs: int) -> Client:
        """A client over an already connected stream socket (unix, vsock, ...)."""
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer, **kwargs)

    @classmethod
    async def connect_vsock(cls, cid: int, port: int, **kwargs: int) -> Client:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (cid, port))
        except BaseException:
            sock.close()
            raise
        return await cls.connect_socket(sock, **kwargs)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with UNAVAILABLE."""
        self._shut(TtrpcError(Code.UNAVAILABLE, "ttrpc connection closed by the client"))
        self._writer.close()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (by either side)."""
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._reader_task)
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    # The calls.

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        reply_type: type[Resp],
        *,
        accept: Callable[[ttrpc_pb2.Response], bool] | None = None,
        **opts: Unpack[CallOptions],
    ) -> Resp:
        """A unary call; raises TtrpcError for a failed status. With `accept`, the answer is the
        first response on the call's stream that `accept` takes: any other (one the server wrote
        for an earlier connection to the same channel, which a virtio-serial port delivers to the
        next) is dropped, as is one that does not decode."""
        timeout = opts.get("timeout")
        payload = request.SerializeToString()
        stream_id, call = self._start(service, method, payload, 0, timeout, opts.get("metadata"))
        call.accept = accept
        try:
            async with self._guard(service, method, timeout, _deadline_of(timeout)):
                await self._out.drain()
                response = await call.response
        finally:
            self._calls.pop(stream_id, None)
        return _unpack(response, reply_type)

    async def server_stream(
        self, service: str, method: str, request: Message, reply_type: type[Resp], **opts: Unpack[CallOptions]
    ) -> AsyncIterator[Resp]:
        """A call answered by a stream of messages. Use it in `async for` and
        leave the loop (or aclose it) to stop listening."""
        timeout = opts.get("timeout")
        inbox = Inbox(self._stream_buffer)
        body = request.SerializeToString()
        stream_id, _ = self._start(
            service, method, body, Flags.REMOTE_CLOSED, timeout, opts.get("metadata"), inbox
        )
        deadline = _deadline_of(timeout)
        try:
            first = True
            while True:
                async with self._guard(service, method, timeout, deadline):
                    if first:
                        first = False
                        await self._out.drain()
                    payload = await inbox.get()
                if payload is None:
                    return
                yield _decode(reply_type, payload)
        finally:
            self._calls.pop(stream_id, None)
            # Releases the connection's reader if it waits for room in the inbox.
            inbox.end(TtrpcError(Code.CANCELLED, "stream abandoned"))

    async def client_stream(
        self,
        service: str,
        method: str,
        requests: AsyncIterable[Message] | Iterable[Message],
        reply_type: type[Resp],
        **opts: Unpack[CallOptions],
    ) -> Resp:
        """A call that sends a stream of messages and gets one answer. If the
        server answers before the requests run out, the rest are not sent."""
        timeout = opts.get("timeout")
        stream_id, call = self._start(service, method, b"", Flags.REMOTE_OPEN, timeout, opts.get("metadata"))
        try:
            async with self._guard(service, method, timeout, _deadline_of(timeout)):
                await self._out.drain()
                async for request in _aiter(requests):
                    if call.response.done():
                        break
                    body = request.SerializeToString()
                    self._out.check_size(body, "stream message")
                    await self._out.send(stream_id, FrameType.DATA, 0, body)
                if not call.response.done():
                    await self._out.send(stream_id, FrameType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA)
                response = await call.response
        finally:
            self._calls.pop(stream_id, None)
        return _unpack(response, reply_type)

    # Internals.

    def _start(
        self,
        service: str,
        method: str,
        payload: bytes,
        flags: int,
        timeout: float | None,
        metadata: Metadata | None,
        inbox: Inbox | None = None,
    ) -> tuple[int, _Call]:
        """Register a call and write its request frame. Runs without
        suspending, so stream ids reach the wire in increasing order."""
        if self._closed is not None:
            raise TtrpcError(self._closed.code, self._closed.message)
        request = ttrpc_pb2.Request(service=service, method=method, payload=payload)
        if timeout is not None:
            request.timeout_nano = max(1, int(timeout * 1e9))
        if metadata:
            for key, values in metadata.items():
                for value in [values] if isinstance(values, str) else values:
                    request.metadata.add(key=key, value=value)
        body = request.SerializeToString()
        self._out.check_size(body, "request")
        stream_id = self._next_id
        if stream_id > _MAX_STREAM_ID:
            raise TtrpcError(Code.UNAVAILABLE, "ttrpc connection has used up its stream ids")
        self._next_id += 2
        call = _Call(asyncio.get_running_loop().create_future(), inbox)
        try:
            self._out.write(stream_id, FrameType.REQUEST, flags, body)
        except (ConnectionError, OSError) as e:
            raise self._lost(e) from None
        self._calls[stream_id] = call
        return stream_id, call

    @contextlib.asynccontextmanager
    async def _guard(
        self, service: str, method: str, seconds: float | None, deadline: float | None
    ) -> AsyncIterator[None]:
        """A call's wait until `deadline` (the loop's time, `seconds` after the call began): its
        expiry and a lost connection become the call's TtrpcError."""
        try:
            async with asyncio.timeout_at(deadline) as scope:
                yield
        except TimeoutError:
            if seconds is None or not scope.expired():
                raise
            raise _deadline(service, method, seconds) from None
        except (ConnectionError, OSError) as e:
            raise self._lost(e) from None

    def _lost(self, error: Exception) -> TtrpcError:
        if self._closed is not None:
            return TtrpcError(self._closed.code, self._closed.message)
        return TtrpcError(Code.UNAVAILABLE, f"ttrpc connection lost: {error}")

    def _shut(self, error: TtrpcError) -> None:
        if self._closed is not None:
            return
        self._closed = error
        calls, self._calls = self._calls, {}
        for call in calls.values():
            if not call.response.done():
                call.response.set_exception(error)
                # Nobody may be waiting on it (a stream's final response).
                call.response.exception()
            if call.inbox is not None:
                call.inbox.end(error)

    async def _read_loop(self) -> None:
        reason = TtrpcError(Code.UNAVAILABLE, "ttrpc connection closed by the server")
        try:
            while True:
                frame = await self._frames.read()
                if frame is None:
                    break
                if isinstance(frame, OversizedFrame):
                    self._oversized(frame)
                elif frame.type is FrameType.RESPONSE:
                    self._response(frame.stream_id, frame.payload)
                elif frame.type is FrameType.DATA:
                    await self._data(frame.stream_id, frame.flags, frame.payload)
                else:
                    raise ProtocolError(f"server sent a {frame.type.name.lower()} frame")
        except ProtocolError as e:
            log.warning("ttrpc: closing connection: %s", e)
            reason = TtrpcError(Code.UNAVAILABLE, f"ttrpc protocol error: {e}")
        except (ConnectionError, OSError) as e:
            reason = TtrpcError(Code.UNAVAILABLE, f"ttrpc connection lost: {e}")
        finally:
            self._shut(reason)
            self._writer.close()

    def _oversized(self, frame: OversizedFrame) -> None:
        error = TtrpcError(
            Code.RESOURCE_EXHAUSTED,
            f"message of {frame.length} bytes exceeds the ttrpc limit of {self._out.max_message} bytes",
        )
        call = self._calls.pop(frame.stream_id, None)
        if call is None:
            return
        if not call.response.done():
            call.response.set_exception(error)
            call.response.exception()
        if call.inbox is not None:
            call.inbox.end(error)

    def _response(self, stream_id: int, payload: bytes) -> None:
        call = self._calls.get(stream_id)
        if call is None:
            log.debug("ttrpc: dropped response for inactive stream %d", stream_id)
            return
        try:
            response = ttrpc_pb2.Response.FromString(payload)
            if call.accept is not None and not call.accept(response):
                log.debug("ttrpc: dropped a response on stream %d that its call does not take", stream_id)
                return
        except DecodeError as e:
            if call.accept is not None:
                log.debug("ttrpc: dropped an undecodable response on stream %d: %s", stream_id, e)
                return
            self._calls.pop(stream_id, None)
            error = TtrpcError(Code.INTERNAL, f"undecodable ttrpc response: {e}")
            if call.inbox is not None:
                call.inbox.end(error)
            if not call.response.done():
                call.response.set_exception(error)
                call.response.exception()
            return
        self._calls.pop(stream_id, None)
        if call.inbox is not None:
            if response.status.code != Code.OK:
                call.inbox.end(TtrpcError.from_status(response.status))
            else:
                if response.payload:
                    call.inbox.put_nowait(response.payload)
                call.inbox.end()
        if not call.response.done():
            call.response.set_result(response)

    async def _data(self, stream_id: int, flags: int, payload: bytes) -> None:
        call = self._calls.get(stream_id)
        if call is None or call.inbox is None:
            log.debug("ttrpc: dropped data for inactive stream %d", stream_id)
            return
        if not flags & Flags.NO_DATA:
            await call.inbox.put(payload)
        if flags & Flags.REMOTE_CLOSED:
            call.inbox.end()
            self._calls.pop(stream_id, None)


def _deadline_of(timeout: float | None) -> float | None:
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


def _deadline(service: str, method: str, timeout: float | None) -> TtrpcError:
    return TtrpcError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: no answer within {timeout} s")


def _decode(message_type: type[Resp], payload: bytes) -> Resp:
    try:
        return message_type.FromString(payload)
    except DecodeError as e:
        raise TtrpcError(Code.INTERNAL, f"undecodable {message_type.DESCRIPTOR.full_name}: {e}") from None


def _unpack(response: ttrpc_pb2.Response, response_type: type[Resp]) -> Resp:
    if response.status.code != Code.OK:
        raise TtrpcError.from_status(response.status)
    return _decode(response_type, response.payload)


async def _aiter(items: AsyncIterable[Message] | Iterable[Message]) -> AsyncIterator[Message]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
