"""Port-forward's wire and splice: SO_ORIGINAL_DST's address, the listener
spinboxd hands over (checked, taken over, served), the window each side keeps
(and checks of the other), and whole connections relayed by the shim's
PortForwarder through vminitd's Forwarder over a real ttrpc connection on a
unix socket, to real TCP servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from guest.vminitd import forward as guest_forward
from guest.vminitd.forward import Forwarder
from spinbox.agent import SERVICE, AgentClient
from spinbox.api.forward import CHUNK, WINDOW, ForwardError, Splice
from spinbox.api.proto import agent_pb2 as pb
from spinbox.shim import portforward
from spinbox.shim.portforward import PortForwarder, PortForwardError, original_port
from spinbox.ttrpc import Server, TtrpcError


def sockaddr_in(address: str, port: int, family: int = socket.AF_INET) -> bytes:
    return struct.pack("=H", family) + struct.pack("!H", port) + socket.inet_aton(address) + bytes(8)


def test_original_port_reads_the_redirected_destination() -> None:
    assert original_port(sockaddr_in("127.0.0.1", 8080)) == 8080
    assert original_port(bytes.fromhex("02001f907f0000010000000000000000")) == 8080  # as the kernel gave it


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (sockaddr_in("127.0.0.1", 80, socket.AF_INET6), "not AF_INET"),
        (sockaddr_in("10.0.0.1", 80), "10.0.0.1:80, not 127.0.0.1"),
        (sockaddr_in("127.0.0.1", 0), "not 127.0.0.1"),
        (b"\x02\x00", "not a sockaddr_in"),
    ],
)
def test_original_port_refuses_what_is_not_a_redirected_localhost_connection(raw: bytes, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        original_port(raw)


def splice() -> Splice:
    return Splice(None, None, "port-forward to port 80")  # type: ignore[arg-type]  # take() uses neither


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        ([pb.ForwardChunk(data=b"x")] * (WINDOW + 1), f"more than {WINDOW} unacknowledged chunks"),
        ([pb.ForwardChunk(data=bytes(CHUNK + 1))], f"a chunk of {CHUNK + 1} bytes"),
        ([pb.ForwardChunk(eof=True), pb.ForwardChunk(data=b"x")], "data after its end of file"),
        ([pb.ForwardChunk(acked=1)], "acknowledged data that was never sent"),
    ],
)
def test_a_side_that_breaks_the_protocol_is_named(messages: list[pb.ForwardChunk], says: str) -> None:
    s = splice()
    with pytest.raises(ForwardError, match=f"port-forward to port 80: the other side .*{says}"):
        for message in messages:
            s.take(message)


def test_acks_ride_on_outgoing_messages_and_free_the_window() -> None:
    async def run() -> None:
        s = splice()
        for _ in range(WINDOW):
            s.take(pb.ForwardChunk(data=b"x"))
        s._to_ack = WINDOW  # written to the local socket
        s._put(pb.ForwardChunk(data=b"reply"))
        s.end()
        sent = [m async for m in s.outgoing()]
        assert [(m.data, m.acked) for m in sent] == [(b"reply", WINDOW)]
        s.take(pb.ForwardChunk(data=b"x"))  # the window is free again

    asyncio.run(run())


class Relay:
    """vminitd's Forwarder served on a unix socket, the shim's relay as its client."""

    def __init__(self, tmp_path: Path, connect_timeout: float = 5.0) -> None:
        self.path = tmp_path / "agent.sock"
        self.server = Server()
        self.guest = Forwarder(connect_timeout=connect_timeout)
        self.server.add_server_stream(SERVICE, "Forward", pb.ForwardRequest, self._forward)
        self.server.add_client_stream(SERVICE, "ForwardInput", pb.ForwardChunk, self._input)

    def _forward(self, req: pb.ForwardRequest, ctx: object) -> AsyncIterator[pb.ForwardChunk]:
        return self.guest.forward(req)

    async def _input(self, requests: AsyncIterator[pb.ForwardChunk], ctx: object) -> object:
        return await self.guest.forward_input(requests)

    async def __aenter__(self) -> Relay:
        await self.server.serve_unix(self.path)
        self.agent = await AgentClient.connect(f"unix:{self.path}")
        self.idle = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        self.forwarder = PortForwarder(self.agent, "pod1", self.idle, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.idle.close()
        await self.agent.close()
        await self.server.close()

    async def connect(
        self, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[None]]:
        """A client connection whose other end the shim relays to `port` in the 'VM'."""
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        r, w = await asyncio.open_connection(sock=theirs)

        async def relay() -> None:
            try:
                await self.forwarder.relay(port, r, w)
            finally:
                w.close()

        return reader, writer, asyncio.create_task(relay())


async def echo_server(host: str) -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()  # after the client's end of file: the half-close reaches both ways

    return await asyncio.start_server(echo, host, 0)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_connection_is_relayed_both_ways_beyond_the_window(tmp_path: Path, host: str) -> None:
    payload = os.urandom(3 * WINDOW * CHUNK + 12345)  # three windows and a bit: acks must flow

    async def run() -> None:
        server = await echo_server(host)
        port = server.sockets[0].getsockname()[1]
        async with server, Relay(tmp_path) as relay:
            reader, writer, task = await relay.connect(port)

            async def send() -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()

            sending = asyncio.create_task(send())
            async with asyncio.timeout(60):
                echoed = await reader.read(-1)  # to the end of file the echo server's close sent
                await sending
                await task
            assert echoed == payload
            assert not relay.guest._connections  # the guest's side is gone too
            writer.close()

    asyncio.run(run())


def test_a_slow_reader_holds_back_only_its_own_connection(tmp_path: Path) -> None:
    async def run() -> None:
        server = await echo_server("127.0.0.1")
        port = server.sockets[0].getsockname()[1]
        async with server, Relay(tmp_path) as relay:
            # Connection 1 sends far more than the window and never reads its echo.
            _, w1, t1 = await relay.connect(port)
            w1.write(os.urandom(8 * WINDOW * CHUNK))
            # Connection 2 still answers at once.
            r2, w2, t2 = await relay.connect(port)
            async with asyncio.timeout(30):
                w2.write(b"ping")
                w2.write_eof()
                assert await r2.read(-1) == b"ping"
                await t2
            t1.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t1
            w1.close()
            w2.close()

    asyncio.run(run())


def test_a_refused_port_closes_the_connection_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed

    async def run() -> None:
        async with Relay(tmp_path) as relay:
            reader, writer, task = await relay.connect(port)
            async with asyncio.timeout(10):
                assert await reader.read(-1) == b""
                with pytest.raises(Exception, match=f"127.0.0.1:{port} in the VM: Connection refused"):
                    await task
            writer.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(run())


def test_the_handed_over_listener_is_served_and_closed() -> None:
    async def run() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        forwarder = await PortForwarder.start(listener.detach(), "/run/netns/x", None, "pod1")  # type: ignore[arg-type]
        assert forwarder.listen_port == port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(10):
            # Not a redirected connection: no SO_ORIGINAL_DST, so it is closed, named in the log.
            assert await reader.read(-1) == b""
        writer.close()
        await forwarder.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(run())


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), "not a listening TCP socket"),
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "not a listening TCP socket"),
        (lambda: socket.create_server(("127.0.0.2", 0)), "on 127.0.0.2, not 127.0.0.1"),
        (lambda: os.open("/dev/null", os.O_RDONLY), "not a socket"),
    ],
)
def test_a_listener_that_is_not_one_is_refused_and_closed(make: object, says: str) -> None:
    made = make()  # type: ignore[operator]
    fd = made.detach() if isinstance(made, socket.socket) else made

    async def run() -> None:
        with pytest.raises(
            PortForwardError, match=f"listener for the network namespace /n of pod 'pod1' .*{says}"
        ):
            await PortForwarder.start(fd, "/n", None, "pod1")  # type: ignore[arg-type]

    asyncio.run(run())
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


def test_connections_beyond_the_hosts_bound_are_closed_as_they_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(portforward, "MAX_CONNECTIONS", 1)

    async def run() -> None:
        async with Relay(tmp_path) as relay:
            busy = asyncio.create_task(asyncio.sleep(3600))
            relay.forwarder.connections.add(busy)
            ours, theirs = socket.socketpair()
            reader, writer = await asyncio.open_connection(sock=ours)
            r, w = await asyncio.open_connection(sock=theirs)
            await relay.forwarder._accepted(r, w)
            async with asyncio.timeout(10):
                assert await reader.read(-1) == b""
            busy.cancel()
            writer.close()

    asyncio.run(run())


def test_connections_beyond_the_guests_bound_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_forward, "MAX_CONNECTIONS", 0)

    async def run() -> None:
        server = await echo_server("127.0.0.1")
        async with server, Relay(tmp_path) as relay:
            _, writer, task = await relay.connect(server.sockets[0].getsockname()[1])
            with pytest.raises(TtrpcError, match="0 connections are forwarded already"):
                await task
            writer.close()

    asyncio.run(run())


def test_a_connect_that_hangs_fails_within_the_guests_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    async def hang(*args: object) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(guest_forward.asyncio, "open_connection", hang)

    async def run() -> None:
        stream = Forwarder(connect_timeout=0.2).forward(pb.ForwardRequest(port=8080))
        with pytest.raises(
            TtrpcError, match=re.escape("127.0.0.1:8080 in the VM: no connection within 0.2 s")
        ):
            await anext(stream)

    asyncio.run(run())


def test_a_host_that_never_sends_its_input_loses_the_connection() -> None:
    async def run() -> None:
        server = await echo_server("127.0.0.1")
        async with server:
            forwarder = Forwarder(connect_timeout=0.2)
            stream = forwarder.forward(pb.ForwardRequest(port=server.sockets[0].getsockname()[1]))
            first = await anext(stream)
            assert first.connection in forwarder._connections
            with pytest.raises(TtrpcError, match=re.escape("the host sent no input stream within 0.2 s")):
                await anext(stream)
            assert not forwarder._connections

    asyncio.run(run())
