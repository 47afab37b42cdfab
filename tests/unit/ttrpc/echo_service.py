"""A small service for the ttrpc tests, built from protobuf's well-known
wrapper messages, and a helper that serves it on a unix socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value, StringValue

from spinbox.ttrpc import CallContext, Client, Code, Server, TtrpcError

SERVICE = "spinbox.test.Echo"
T = TypeVar("T")


class EchoService:
    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.started = asyncio.Event()

    def register(self, server: Server) -> None:
        server.add_unary(SERVICE, "Echo", StringValue, self.echo)
        server.add_unary(SERVICE, "Fail", StringValue, self.fail)
        server.add_unary(SERVICE, "Crash", StringValue, self.crash)
        server.add_unary(SERVICE, "Sleep", DoubleValue, self.sleep)
        server.add_unary(SERVICE, "Metadata", StringValue, self.metadata)
        server.add_unary(SERVICE, "Deadline", StringValue, self.deadline)
        server.add_unary(SERVICE, "Grow", Int64Value, self.grow)
        server.add_unary(SERVICE, "GiveUp", StringValue, self.give_up)
        server.add_server_stream(SERVICE, "Count", Int64Value, self.count)
        server.add_server_stream(SERVICE, "CountThenFail", Int64Value, self.count_then_fail)
        server.add_client_stream(SERVICE, "Sum", Int64Value, self.sum)
        server.add_client_stream(SERVICE, "Join", StringValue, self.join)

    async def echo(self, req: StringValue, ctx: CallContext) -> StringValue:
        return StringValue(value=req.value)

    async def fail(self, req: StringValue, ctx: CallContext) -> StringValue:
        raise TtrpcError(Code.NOT_FOUND, f"no container {req.value}")

    async def crash(self, req: StringValue, ctx: CallContext) -> StringValue:
        raise ValueError(f"cannot parse {req.value!r}")

    async def sleep(self, req: DoubleValue, ctx: CallContext) -> DoubleValue:
        self.started.set()
        try:
            await asyncio.sleep(req.value)
        except asyncio.CancelledError:
            self.cancelled.append(ctx.method)
            raise
        return req

    async def metadata(self, req: StringValue, ctx: CallContext) -> StringValue:
        return StringValue(value=",".join(ctx.metadata.get(req.value, [])))

    async def deadline(self, req: StringValue, ctx: CallContext) -> StringValue:
        if ctx.deadline is None:
            return StringValue(value="none")
        left = ctx.deadline - asyncio.get_running_loop().time()
        return StringValue(value="set" if left > 0 else "past")

    async def grow(self, req: Int64Value, ctx: CallContext) -> StringValue:
        return StringValue(value="g" * req.value)

    async def give_up(self, req: StringValue, ctx: CallContext) -> StringValue:
        waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting.cancel()
        await waiting  # raises CancelledError out of the handler
        return req

    async def count(self, req: Int64Value, ctx: CallContext) -> AsyncIterator[Int64Value]:
        for i in range(req.value):
            yield Int64Value(value=i)

    async def count_then_fail(self, req: Int64Value, ctx: CallContext) -> AsyncIterator[Int64Value]:
        for i in range(req.value):
            yield Int64Value(value=i)
        raise TtrpcError(Code.DATA_LOSS, "ran out")

    async def sum(self, requests: AsyncIterator[Int64Value], ctx: CallContext) -> Int64Value:
        total = 0
        async for req in requests:
            total += req.value
        return Int64Value(value=total)

    async def join(self, requests: AsyncIterator[StringValue], ctx: CallContext) -> StringValue:
        parts = []
        async for req in requests:
            if req.value == "stop":
                raise TtrpcError(Code.ABORTED, "told to stop")
            parts.append(req.value)
        return StringValue(value="".join(parts))


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, service: EchoService | None = None) -> AsyncIterator[tuple[Server, Client]]:
    server = Server()
    (service or EchoService()).register(server)
    path = tmp_path / "ttrpc.sock"
    await server.serve_unix(path)
    client = await Client.connect_unix(path)
    try:
        yield server, client
    finally:
        await client.close()
        await server.close()


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(30):
            return await main()

    return asyncio.run(bounded())
