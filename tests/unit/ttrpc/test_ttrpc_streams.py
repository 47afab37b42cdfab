"""Streaming calls (ttrpc 1.2 data frames) in both directions."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value, StringValue

from spinbox.api.proto import ttrpc_pb2
from spinbox.ttrpc import Client, Code, TtrpcError
from tests.unit.ttrpc.echo_service import SERVICE, run, serving


def test_server_stream_yields_every_message(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            got = [
                m.value async for m in client.server_stream(SERVICE, "Count", Int64Value(value=5), Int64Value)
            ]
            assert got == [0, 1, 2, 3, 4]
            assert [m async for m in client.server_stream(SERVICE, "Count", Int64Value(), Int64Value)] == []

    run(main)


def test_server_stream_longer_than_its_buffer(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            got = []
            async for m in client.server_stream(SERVICE, "Count", Int64Value(value=2000), Int64Value):
                got.append(m.value)
                if m.value % 100 == 0:
                    await asyncio.sleep(0)  # a consumer slower than the producer
            assert got == list(range(2000))

    run(main)


def test_server_stream_error_after_data(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            got = []
            with pytest.raises(TtrpcError) as err:
                async for m in client.server_stream(
                    SERVICE, "CountThenFail", Int64Value(value=3), Int64Value
                ):
                    got.append(m.value)
            assert got == [0, 1, 2]
            assert err.value.code is Code.DATA_LOSS

    run(main)


def test_leaving_a_server_stream_early(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path):
            client = await Client.connect_unix(tmp_path / "ttrpc.sock", stream_buffer=2)
            stream = client.server_stream(SERVICE, "Count", Int64Value(value=1000), Int64Value)
            async with contextlib.aclosing(stream):
                async for m in stream:
                    if m.value == 3:
                        # Let the connection fill the stream's buffer and wait for room.
                        await asyncio.sleep(0.2)
                        break
            # The connection is not stuck behind the abandoned stream, and what
            # the server still sends for it is dropped.
            assert (await client.call(SERVICE, "Echo", StringValue(value="x"), StringValue)).value == "x"
            await client.close()

    run(main)


def test_server_stream_deadline(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            with pytest.raises(TtrpcError) as err:
                stream = client.server_stream(
                    SERVICE, "Sleep", DoubleValue(value=3600), DoubleValue, timeout=0.05
                )
                async for _ in stream:
                    pass
            assert err.value.code is Code.DEADLINE_EXCEEDED

    run(main)


def test_client_stream_sums_its_input(tmp_path: Path) -> None:
    async def main() -> None:
        async def numbers() -> AsyncIterator[Int64Value]:
            for i in range(1, 101):
                yield Int64Value(value=i)

        async with serving(tmp_path) as (_, client):
            assert (await client.client_stream(SERVICE, "Sum", numbers(), Int64Value)).value == 5050
            plain = [Int64Value(value=i) for i in range(10)]
            assert (await client.client_stream(SERVICE, "Sum", plain, Int64Value)).value == 45
            assert (await client.client_stream(SERVICE, "Sum", [], Int64Value)).value == 0
            # Empty messages are messages too.
            empties = [Int64Value(), Int64Value(value=7), Int64Value()]
            assert (await client.client_stream(SERVICE, "Sum", empties, Int64Value)).value == 7

    run(main)


def test_client_stream_error(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            words = [StringValue(value=w) for w in ("a", "b", "stop", "c")]
            with pytest.raises(TtrpcError) as err:
                await client.client_stream(SERVICE, "Join", words, StringValue)
            assert err.value.code is Code.ABORTED
            words = [StringValue(value=w) for w in ("a", "b", "c")]
            assert (await client.client_stream(SERVICE, "Join", words, StringValue)).value == "abc"

    run(main)


def test_streams_and_unary_calls_interleave(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):

            async def count(n: int) -> list[int]:
                return [
                    m.value
                    async for m in client.server_stream(SERVICE, "Count", Int64Value(value=n), Int64Value)
                ]

            async def total(n: int) -> int:
                items = [Int64Value(value=i) for i in range(n)]
                return (await client.client_stream(SERVICE, "Sum", items, Int64Value)).value

            async def echo(i: int) -> str:
                return (await client.call(SERVICE, "Echo", StringValue(value=str(i)), StringValue)).value

            counts = [count(n) for n in range(50)]
            totals = [total(n) for n in range(50)]
            echoes = [echo(i) for i in range(50)]
            results = await asyncio.gather(*counts, *totals, *echoes)
            assert results[:50] == [list(range(n)) for n in range(50)]
            assert results[50:100] == [sum(range(n)) for n in range(50)]
            assert results[100:] == [str(i) for i in range(50)]

    run(main)


HEADER = struct.Struct(">IIBB")


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes]:
    length, stream_id, kind, flags = HEADER.unpack(await reader.readexactly(10))
    return stream_id, kind, flags, await reader.readexactly(length)


def test_wire_frames_of_a_server_stream(tmp_path: Path) -> None:
    """Data frames carry messages; the stream ends with a data frame flagged
    remote-closed and no-data, as Go ttrpc peers expect."""

    async def main() -> None:
        async with serving(tmp_path):
            reader, writer = await asyncio.open_unix_connection(tmp_path / "ttrpc.sock")
            req = ttrpc_pb2.Request(
                service=SERVICE, method="Count", payload=Int64Value(value=2).SerializeToString()
            )
            body = req.SerializeToString()
            writer.write(HEADER.pack(len(body), 1, 1, 0x1) + body)
            frames = [await read_frame(reader) for _ in range(3)]
            assert frames == [
                (1, 3, 0, Int64Value(value=0).SerializeToString()),
                (1, 3, 0, Int64Value(value=1).SerializeToString()),
                (1, 3, 0x5, b""),
            ]
            writer.close()

    run(main)


def test_wire_frames_of_a_client_stream(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path):
            reader, writer = await asyncio.open_unix_connection(tmp_path / "ttrpc.sock")
            body = ttrpc_pb2.Request(service=SERVICE, method="Sum").SerializeToString()
            writer.write(HEADER.pack(len(body), 3, 1, 0x2) + body)
            for n in (4, 5):
                data = Int64Value(value=n).SerializeToString()
                writer.write(HEADER.pack(len(data), 3, 3, 0) + data)
            writer.write(HEADER.pack(0, 3, 3, 0x1 | 0x4))
            stream_id, kind, _, payload = await read_frame(reader)
            assert (stream_id, kind) == (3, 2)
            response = ttrpc_pb2.Response.FromString(payload)
            assert response.status.code == 0
            assert Int64Value.FromString(response.payload).value == 9
            writer.close()

    run(main)
