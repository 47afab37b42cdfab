"""Unary calls between our client and server over a real unix socket."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from pathlib import Path

import pytest
from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value, StringValue

from spinbox.ttrpc import Client, Code, Server, TtrpcError
from spinbox.ttrpc.server import ok_response
from tests.unit.ttrpc.echo_service import SERVICE, EchoService, run, serving


def test_unary_round_trip(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            resp = await client.call(SERVICE, "Echo", StringValue(value="hello"), StringValue)
            assert resp.value == "hello"
            empty = await client.call(SERVICE, "Echo", StringValue(), StringValue)
            assert empty.value == ""

    run(main)


def test_named_error_reaches_caller(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            with pytest.raises(TtrpcError) as err:
                await client.call(SERVICE, "Fail", StringValue(value="c1"), StringValue)
            assert err.value.code is Code.NOT_FOUND
            assert err.value.message == "no container c1"

    run(main)


def test_unexpected_exception_is_internal_without_traceback(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            with pytest.raises(TtrpcError) as err:
                await client.call(SERVICE, "Crash", StringValue(value="x"), StringValue)
            assert err.value.code is Code.INTERNAL
            assert err.value.message == "cannot parse 'x'"
            # The connection is still usable.
            assert (await client.call(SERVICE, "Echo", StringValue(value="ok"), StringValue)).value == "ok"

    run(main)


def test_unknown_service_and_method_are_unimplemented(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            with pytest.raises(TtrpcError) as err:
                await client.call("no.Such", "Echo", StringValue(), StringValue)
            assert err.value.code is Code.UNIMPLEMENTED
            assert "no.Such" in err.value.message
            with pytest.raises(TtrpcError) as err:
                await client.call(SERVICE, "Nope", StringValue(), StringValue)
            assert err.value.code is Code.UNIMPLEMENTED
            assert "Nope" in err.value.message

    run(main)


def test_metadata_reaches_handler(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            metadata = {"containerd-namespace-ttrpc": "k8s.io", "multi": ["a", "b"]}
            call = client.call
            one = await call(
                SERVICE,
                "Metadata",
                StringValue(value="containerd-namespace-ttrpc"),
                StringValue,
                metadata=metadata,
            )
            assert one.value == "k8s.io"
            many = await call(SERVICE, "Metadata", StringValue(value="multi"), StringValue, metadata=metadata)
            assert many.value == "a,b"
            none = await call(SERVICE, "Metadata", StringValue(value="multi"), StringValue)
            assert none.value == ""

    run(main)


def test_thousand_concurrent_calls_on_one_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            calls = [
                client.call(SERVICE, "Echo", StringValue(value=f"m{i}" * (i % 7)), StringValue)
                for i in range(1000)
            ]
            answers = await asyncio.gather(*calls)
            assert [a.value for a in answers] == [f"m{i}" * (i % 7) for i in range(1000)]

    run(main)


def test_expired_deadline_is_deadline_exceeded(tmp_path: Path) -> None:
    service = EchoService()

    async def main() -> None:
        async with serving(tmp_path, service) as (_, client):
            with pytest.raises(TtrpcError) as err:
                await client.call(SERVICE, "Sleep", DoubleValue(value=3600), DoubleValue, timeout=0.05)
            assert err.value.code is Code.DEADLINE_EXCEEDED
            assert (
                await client.call(SERVICE, "Deadline", StringValue(), StringValue, timeout=600)
            ).value == "set"
            assert (await client.call(SERVICE, "Deadline", StringValue(), StringValue)).value == "none"

    run(main)


def test_server_enforces_request_deadline(tmp_path: Path) -> None:
    """The server cancels a handler whose deadline passed and answers
    DEADLINE_EXCEEDED itself, even when the client does not time out."""
    service = EchoService()

    async def main() -> None:
        server = Server()
        service.register(server)
        await server.serve_unix(tmp_path / "s.sock")
        client = await Client.connect_unix(tmp_path / "s.sock")
        # Send the deadline on the wire but wait without a local timeout.
        _stream_id, call = client._start(
            SERVICE, "Sleep", DoubleValue(value=3600).SerializeToString(), 0, 0.05, None
        )
        response = await call.response
        assert response.status.code == Code.DEADLINE_EXCEEDED
        assert service.cancelled == ["Sleep"]
        await client.close()
        await server.close()

    run(main)


def test_cancelled_call_leaves_connection_usable(tmp_path: Path) -> None:
    service = EchoService()

    async def main() -> None:
        async with serving(tmp_path, service) as (_, client):
            task = asyncio.create_task(client.call(SERVICE, "Sleep", DoubleValue(value=0.2), DoubleValue))
            await service.started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (
                await client.call(SERVICE, "Echo", StringValue(value="after"), StringValue)
            ).value == "after"
            # The late answer to the cancelled call is dropped quietly.
            await asyncio.sleep(0.3)
            assert (
                await client.call(SERVICE, "Echo", StringValue(value="later"), StringValue)
            ).value == "later"

    run(main)


def test_oversized_request_is_refused_locally(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            with pytest.raises(TtrpcError) as err:
                await client.call(SERVICE, "Echo", StringValue(value="x" * (4 << 20)), StringValue)
            assert err.value.code is Code.RESOURCE_EXHAUSTED
            big = "y" * ((4 << 20) - 100)
            assert (await client.call(SERVICE, "Echo", StringValue(value=big), StringValue)).value == big

    run(main)


def test_server_close_fails_pending_calls(tmp_path: Path) -> None:
    service = EchoService()

    async def main() -> None:
        server = Server()
        service.register(server)
        await server.serve_unix(tmp_path / "s.sock")
        client = await Client.connect_unix(tmp_path / "s.sock")
        task = asyncio.create_task(client.call(SERVICE, "Sleep", DoubleValue(value=3600), DoubleValue))
        await service.started.wait()
        await server.close()
        with pytest.raises(TtrpcError) as err:
            await task
        assert err.value.code is Code.UNAVAILABLE
        assert service.cancelled == ["Sleep"]
        await client.wait_closed()
        assert client.closed
        assert not (tmp_path / "s.sock").exists()
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE, "Echo", StringValue(), StringValue)
        assert err.value.code is Code.UNAVAILABLE

    run(main)


def test_client_close_is_orderly(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_server, client):
            assert (await client.call(SERVICE, "Echo", StringValue(value="a"), StringValue)).value == "a"
            await client.close()
            await client.close()
            with pytest.raises(TtrpcError) as err:
                await client.call(SERVICE, "Echo", StringValue(), StringValue)
            assert err.value.code is Code.UNAVAILABLE
            # The server is still serving new connections.
            other = await Client.connect_unix(tmp_path / "ttrpc.sock")
            assert (await other.call(SERVICE, "Echo", StringValue(value="b"), StringValue)).value == "b"
            await other.close()

    run(main)


def test_oversized_response_is_resource_exhausted(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            with pytest.raises(TtrpcError) as err:
                await client.call(SERVICE, "Grow", Int64Value(value=5 << 20), StringValue)
            assert err.value.code is Code.RESOURCE_EXHAUSTED
            assert (
                len((await client.call(SERVICE, "Grow", Int64Value(value=1 << 20), StringValue)).value)
                == 1 << 20
            )

    run(main)


def test_handler_escaping_cancellation_still_answers(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            with pytest.raises(TtrpcError) as err:
                await client.call(SERVICE, "GiveUp", StringValue(), StringValue)
            assert err.value.code is Code.CANCELLED

    run(main)


def test_client_skips_an_oversized_response(tmp_path: Path) -> None:
    """A peer answering with a frame over the cap fails that call only."""
    header = struct.Struct(">IIBB")

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            length, stream_id, _, _ = header.unpack(await reader.readexactly(10))
            await reader.readexactly(length)
            if stream_id == 1:
                writer.write(header.pack((4 << 20) + 1, 1, 2, 0) + b"\0" * ((4 << 20) + 1))
            else:
                answer = ok_response(StringValue(value="fine").SerializeToString())
                writer.write(header.pack(len(answer), stream_id, 2, 0) + answer)
        await writer.drain()
        await reader.read()
        writer.close()

    async def main() -> None:
        listener = await asyncio.start_unix_server(peer, path=str(tmp_path / "peer.sock"))
        client = await Client.connect_unix(tmp_path / "peer.sock")
        first = asyncio.create_task(client.call(SERVICE, "Echo", StringValue(), StringValue))
        second = asyncio.create_task(client.call(SERVICE, "Echo", StringValue(), StringValue))
        with pytest.raises(TtrpcError) as err:
            await first
        assert err.value.code is Code.RESOURCE_EXHAUSTED
        assert (await second).value == "fine"
        await client.close()
        listener.close()

    run(main)


def test_serve_an_inherited_listening_socket(tmp_path: Path) -> None:
    """The shim's server gets its listener as a bare fd (fd 3)."""

    async def main() -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / "inherited.sock"))
        listener.listen()
        fd = os.dup(listener.fileno())
        listener.close()
        server = Server()
        EchoService().register(server)
        await server.serve_socket(socket.socket(fileno=fd))
        client = await Client.connect_unix(tmp_path / "inherited.sock")
        assert (await client.call(SERVICE, "Echo", StringValue(value="fd"), StringValue)).value == "fd"
        await client.close()
        await server.close()

    run(main)


def test_calls_beyond_the_connection_limit_are_refused(tmp_path: Path) -> None:
    service = EchoService()

    async def main() -> None:
        server = Server(max_calls=10)
        service.register(server)
        await server.serve_unix(tmp_path / "s.sock")
        client = await Client.connect_unix(tmp_path / "s.sock")
        sleepers = [
            asyncio.create_task(client.call(SERVICE, "Sleep", DoubleValue(value=3600), DoubleValue))
            for _ in range(10)
        ]
        await service.started.wait()
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE, "Echo", StringValue(value="one too many"), StringValue)
        assert err.value.code is Code.RESOURCE_EXHAUSTED
        assert "more than 10 calls" in err.value.message
        for task in sleepers:
            task.cancel()
        await client.close()
        await server.close()

    run(main)
