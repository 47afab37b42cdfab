"""The frame parser and a live server against broken input: property and
fuzz tests. A broken frame ends its connection (never the process) and the
parser never holds more than one message."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import tracemalloc

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spinbox.api.proto import rpc_status_pb2, ttrpc_pb2
from spinbox.ttrpc import Code, Server
from spinbox.ttrpc.frame import (
    MAX_MESSAGE,
    Frame,
    FrameReader,
    FrameType,
    OversizedFrame,
    ProtocolError,
    encode_frame,
)
from spinbox.ttrpc.server import ok_response
from tests.unit.ttrpc.echo_service import SERVICE, EchoService, run

HEADER = struct.Struct(">IIBB")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

frames = st.builds(
    Frame,
    stream_id=st.integers(0, 2**32 - 1),
    type=st.sampled_from(list(FrameType)),
    flags=st.integers(0, 255),
    payload=st.binary(max_size=300),
)


async def parse(data: bytes, chunks: list[int] | None = None, max_message: int = MAX_MESSAGE) -> list[object]:
    """Feed data (in chunks of the given sizes) to a FrameReader and return
    what it produced, ending with None (clean end) or the ProtocolError."""
    reader = asyncio.StreamReader()
    pos = 0
    for size in chunks or []:
        reader.feed_data(data[pos : pos + size])
        pos += size
    reader.feed_data(data[pos:])
    reader.feed_eof()
    frames = FrameReader(reader, max_message)
    out: list[object] = []
    while True:
        try:
            item = await frames.read()
        except ProtocolError as e:
            out.append(e)
            return out
        out.append(item)
        if item is None:
            return out


@FUZZ
@given(st.lists(frames, max_size=8), st.lists(st.integers(1, 50), max_size=20))
def test_valid_frames_round_trip_in_any_chunking(items: list[Frame], chunks: list[int]) -> None:
    data = b"".join(encode_frame(f.stream_id, f.type, f.flags, f.payload) for f in items)
    assert asyncio.run(parse(data, chunks)) == [*items, None]


@FUZZ
@given(st.lists(frames, min_size=1, max_size=4), st.data())
def test_truncated_stream_is_a_protocol_error(items: list[Frame], data: st.DataObject) -> None:
    encoded = [encode_frame(f.stream_id, f.type, f.flags, f.payload) for f in items]
    whole = b"".join(encoded)
    boundaries = {sum(len(e) for e in encoded[:i]) for i in range(len(encoded) + 1)}
    cut = data.draw(st.integers(0, len(whole) - 1).filter(lambda n: n not in boundaries))
    result = asyncio.run(parse(whole[:cut]))
    assert isinstance(result[-1], ProtocolError)
    assert all(isinstance(r, Frame) for r in result[:-1])


@FUZZ
@given(st.binary(max_size=2000))
def test_garbage_ends_cleanly_or_with_a_protocol_error(garbage: bytes) -> None:
    result = asyncio.run(parse(garbage, max_message=256))
    assert result[-1] is None or isinstance(result[-1], ProtocolError)
    assert all(isinstance(r, Frame | OversizedFrame) for r in result[:-1])


@FUZZ
@given(st.integers(4, 255), st.integers(0, 2**32 - 1))
def test_unknown_frame_type_is_a_protocol_error(kind: int, stream_id: int) -> None:
    result = asyncio.run(parse(HEADER.pack(0, stream_id, kind, 0)))
    assert isinstance(result[0], ProtocolError)
    assert f"unknown frame type {kind}" in str(result[0])


def test_oversized_frame_is_skipped_and_the_next_one_read() -> None:
    big = (MAX_MESSAGE + 1) * b"x"
    after = encode_frame(3, FrameType.REQUEST, 0, b"next")
    result = asyncio.run(parse(encode_frame(1, FrameType.REQUEST, 0, big) + after))
    assert result == [
        OversizedFrame(1, FrameType.REQUEST, 0, MAX_MESSAGE + 1),
        Frame(3, FrameType.REQUEST, 0, b"next"),
        None,
    ]


def test_impossible_length_is_a_protocol_error() -> None:
    result = asyncio.run(parse(HEADER.pack(0x01000000, 1, 1, 0) + b"x" * 100))
    assert isinstance(result[0], ProtocolError)


def test_skipping_an_oversized_frame_holds_no_more_than_a_chunk() -> None:
    """Memory stays bounded while a 15 MiB frame is read past."""
    length = 15 << 20

    async def main() -> object:
        reader = asyncio.StreamReader(limit=64 << 10)
        frames = FrameReader(reader)

        async def feed() -> None:
            reader.feed_data(HEADER.pack(length, 1, 1, 0))
            chunk = b"z" * (64 << 10)
            for _ in range(length // len(chunk)):
                reader.feed_data(chunk)
                await asyncio.sleep(0)
            reader.feed_eof()

        feeder = asyncio.create_task(feed())
        item = await frames.read()
        await feeder
        return item

    tracemalloc.start()
    try:
        item = asyncio.run(main())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert item == OversizedFrame(1, FrameType.REQUEST, 0, length)
    assert peak < 4 << 20


# A live server fed broken input over a socket pair.


async def exchange(data: bytes, then_echo: bool = False) -> tuple[bytes, bool]:
    """Send data to a fresh server connection and read until it closes the
    connection (or, with then_echo, until it answers an Echo after it)."""
    server = Server()
    EchoService().register(server)
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    r, w = await asyncio.open_connection(sock=theirs)
    session = asyncio.create_task(server.serve_connection(r, w))
    reader, writer = await asyncio.open_connection(sock=ours)
    writer.write(data)
    if then_echo:
        body = ttrpc_pb2.Request(
            service=SERVICE, method="Echo", payload=StringValue(value="alive").SerializeToString()
        )
        writer.write(encode_frame(0x7FFFFFFF, FrameType.REQUEST, 0, body.SerializeToString()))
    else:
        writer.write_eof()
    answer = b""
    closed = False
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            closed = True
            break
        answer += chunk
        if then_echo and b"alive" in answer:
            break
    writer.close()
    await session
    await server.close()
    return answer, closed


def responses(data: bytes) -> list[tuple[int, ttrpc_pb2.Response]]:
    out = []
    while data:
        length, stream_id, kind, _ = HEADER.unpack(data[:10])
        assert kind == FrameType.RESPONSE
        out.append((stream_id, ttrpc_pb2.Response.FromString(data[10 : 10 + length])))
        data = data[10 + length :]
    return out


@FUZZ
@given(st.binary(min_size=1, max_size=500))
def test_server_survives_garbage(garbage: bytes) -> None:
    """Whatever arrives, the server either answers frames with statuses or
    closes the connection; the test process carries on."""
    answer, closed = run(lambda: exchange(garbage))
    assert closed
    for _, response in responses(answer):
        assert response.status.code in set(Code)


def test_server_closes_connection_on_unknown_type_and_logs_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="spinbox.ttrpc"):
        answer, closed = run(lambda: exchange(HEADER.pack(0, 1, 9, 0)))
    assert closed and answer == b""
    assert "unknown frame type 9" in caplog.text


def test_server_answers_oversized_request_and_keeps_serving() -> None:
    big = encode_frame(1, FrameType.REQUEST, 0, b"\0" * (MAX_MESSAGE + 10))
    answer, closed = run(lambda: exchange(big, then_echo=True))
    assert not closed
    (first_id, first), (echo_id, echo) = responses(answer)
    assert (first_id, first.status.code) == (1, Code.RESOURCE_EXHAUSTED)
    assert (echo_id, StringValue.FromString(echo.payload).value) == (0x7FFFFFFF, "alive")


def test_server_rejects_bad_stream_ids_and_undecodable_requests() -> None:
    request = ttrpc_pb2.Request(service=SERVICE, method="Echo").SerializeToString()
    data = (
        encode_frame(2, FrameType.REQUEST, 0, request)  # even: not a client stream
        + encode_frame(5, FrameType.REQUEST, 0, b"\xff\xff\xff")  # not a Request
        + encode_frame(3, FrameType.REQUEST, 0, request)  # goes backwards
    )
    answer, _ = run(lambda: exchange(data, then_echo=True))
    got = responses(answer)
    assert [(i, r.status.code) for i, r in got[:3]] == [
        (2, Code.INVALID_ARGUMENT),
        (5, Code.INVALID_ARGUMENT),
        (3, Code.INVALID_ARGUMENT),
    ]
    assert got[3][0] == 0x7FFFFFFF


@given(st.binary(max_size=70000))
@settings(max_examples=50, deadline=None)
def test_hand_encoded_ok_response_matches_protobuf(body: bytes) -> None:
    expected = ttrpc_pb2.Response(status=rpc_status_pb2.Status(code=0), payload=body).SerializeToString()
    assert ok_response(body) == expected
