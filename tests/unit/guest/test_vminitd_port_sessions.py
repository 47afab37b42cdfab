"""Sessions on one byte stream shaped like a virtio-serial port (a character device that
stays open across host clients), here a raw pty: a new client without a visible
disconnect, and garbage, each start a fresh session."""

from __future__ import annotations

import asyncio
import os
import pty
import tty

from google.protobuf.wrappers_pb2 import StringValue

from guest.vminitd.channels import PortSessions
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
