"""Sessions on one byte stream (a virtio-serial port's shape), here a socket pair:
a new client without a visible disconnect, and garbage, each start a fresh session."""

from __future__ import annotations

import asyncio
import os
import socket

from google.protobuf.wrappers_pb2 import StringValue

from guest.vminitd.channels import PortSessions
from spinbox.ttrpc import CallContext, Client, Server

SERVICE = "spinbox.test.Echo"


async def echo(req: StringValue, ctx: CallContext) -> StringValue:
    return StringValue(value=req.value)


async def client_on(fd: int) -> Client:
    return await Client.connect_socket(socket.socket(fileno=os.dup(fd)))


async def ask(fd: int, text: str) -> str:
    client = await client_on(fd)
    try:
        reply = await asyncio.wait_for(client.call(SERVICE, "Echo", StringValue(value=text), StringValue), 5)
        return reply.value
    finally:
        await client.close()


def run_with_port(body: object) -> None:
    async def main() -> None:
        server = Server()
        server.add_unary(SERVICE, "Echo", StringValue, echo)
        guest, host = socket.socketpair()
        with guest, host:
            sessions = asyncio.ensure_future(PortSessions(server, guest.fileno()).run())
            try:
                await body(host.fileno())  # type: ignore[operator]
            finally:
                sessions.cancel()
                await asyncio.gather(sessions, return_exceptions=True)

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
        for _ in range(20):  # garbage and the next request may share one read: ask again
            try:
                assert await ask(fd, "after") == "after"
                return
            except TimeoutError:
                continue
        raise AssertionError("no answer after garbage")

    run_with_port(body)
