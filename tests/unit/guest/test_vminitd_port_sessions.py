"""Sessions on one byte stream shaped like a virtio-serial port (a character device that
stays open across host clients), here a raw pty: a new client without a visible
disconnect, and garbage, each start a fresh session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import struct
import tty

import pytest
from google.protobuf.wrappers_pb2 import StringValue

from guest.vminitd import channels
from guest.vminitd.channels import PortSessions
from spinbox.api.proto.ttrpc_pb2 import Request, Response
from spinbox.ttrpc import CallContext, Client, Server

SERVICE = "spinbox.test.Echo"


async def echo(req: StringValue, ctx: CallContext) -> StringValue:
    return StringValue(value=req.value)


async def ask(fd: int, text: str) -> str:
    """One client's call on the host end; the client's reading side is closed after it."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    rfile = os.fdopen(os.dup(fd), "rb", buffering=0)
    rtransport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), rfile)
    wfile = os.fdopen(os.dup(fd), "wb", buffering=0)
    wtransport, wprotocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, wfile)
    client = Client(reader, asyncio.StreamWriter(wtransport, wprotocol, reader, loop))
    try:
        reply = await asyncio.wait_for(client.call(SERVICE, "Echo", StringValue(value=text), StringValue), 5)
        return reply.value
    finally:
        rtransport.close()  # a character device never reads EOF by itself
        await client.close()


def run_with_port(body: object) -> None:
    async def main() -> None:
        server = Server()
        server.add_unary(SERVICE, "Echo", StringValue, echo)
        host, guest = pty.openpty()
        tty.setraw(guest)
        tty.setraw(host)
        try:
            sessions = asyncio.ensure_future(PortSessions(server, guest).run())
            try:
                await body(host)  # type: ignore[operator]
            finally:
                sessions.cancel()
                await asyncio.gather(sessions, return_exceptions=True)
        finally:
            os.close(host)
            os.close(guest)

    asyncio.run(main())


def test_a_new_client_without_a_disconnect() -> None:
    async def body(fd: int) -> None:
        # Each client counts stream ids from 1 on the same, never-closed stream.
        for i in range(3):
            assert await ask(fd, f"hello {i}") == f"hello {i}"

    run_with_port(body)


def test_garbage_ends_the_session_and_serving_goes_on() -> None:
    async def body(fd: int) -> None:
        assert await ask(fd, "before") == "before"
        os.write(fd, b"\xff" * 10 + b"not a frame at all")
        os.write(fd, os.urandom(3000))
        # The next client's first request is found behind the garbage.
        assert await ask(fd, "after") == "after"
        assert await ask(fd, "again") == "again"

    run_with_port(body)


def test_a_reply_held_back_across_a_late_end_of_file_is_delivered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest driver reports the previous host's close after the next host's request was read;
    meanwhile the port takes no writes (no host), so the reply waits in the session. It reaches
    the host once the port takes writes again."""

    async def main() -> None:
        server = Server()
        server.add_unary(SERVICE, "Echo", StringValue, echo)
        payload = Request(
            service=SERVICE, method="Echo", payload=StringValue(value="late").SerializeToString()
        )
        body = payload.SerializeToString()
        reads = [struct.pack(">IIBB", len(body), 1, 1, 0) + body, b""]
        forever = asyncio.Event()

        async def fake_read(fd: int) -> bytes:
            if reads:
                return reads.pop(0)
            await forever.wait()
            return b""

        async def connected(fd: int) -> None:
            return None

        monkeypatch.setattr(channels, "read", fake_read)
        monkeypatch.setattr(channels, "_wait_host", connected)
        replies, port = os.pipe()
        os.set_blocking(port, False)
        filler = 0
        with contextlib.suppress(BlockingIOError):
            while True:  # the port takes no writes: the reply is held back
                filler += os.write(port, b"\0" * 4096)
        sessions = asyncio.ensure_future(channels.PortSessions(server, port).run())
        try:
            await asyncio.sleep(0.3)  # the request is answered, and the end of file read
            loop = asyncio.get_running_loop()
            while filler:
                filler -= len(os.read(replies, min(filler, 65536)))
            header = await asyncio.wait_for(loop.run_in_executor(None, os.read, replies, 10), 5)
            length, stream_id, kind, _ = struct.unpack(">IIBB", header)
            response = Response.FromString(os.read(replies, length))
            assert (stream_id, kind) == (1, 2)
            assert StringValue.FromString(response.payload).value == "late"
        finally:
            sessions.cancel()
            await asyncio.gather(sessions, return_exceptions=True)
            os.close(replies)
            os.close(port)

    asyncio.run(main())
