"""Driving the guest agent through AgentClient the way the shim does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from spinbox.api.proto import agent_pb2 as pb
from spinbox.vm.agent import AgentClient
from tests.integration.guest import oci


@dataclass(frozen=True)
class Result:
    stdout: bytes
    stderr: bytes
    status: int


async def collect(agent: AgentClient, cid: str, eid: str = "", stream: int = pb.STDOUT) -> bytes:
    parts = [chunk async for chunk in agent.read_output(cid, eid, stream)]  # type: ignore[arg-type]
    return b"".join(parts)


async def feed(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def run(
    agent: AgentClient, cid: str, *args: str, stdin: bytes | None = None, spec: bytes | None = None
) -> Result:
    """Creates, starts, reads, waits for and deletes a container running `args`."""
    io = pb.IoConfig(stdin=stdin is not None, stdout=True, stderr=True)
    await agent.create_container(cid, spec or oci.spec(*args), io)
    out = asyncio.ensure_future(collect(agent, cid))
    err = asyncio.ensure_future(collect(agent, cid, stream=pb.STDERR))
    await agent.start(cid)
    if stdin is not None:
        await agent.write_input(cid, feed(stdin))
    status = (await agent.wait(cid)).exit_status
    result = Result(await out, await err, status)
    deleted = await agent.delete_process(cid)
    assert deleted.exit_status == status
    return result


async def read_until(chunks: AsyncIterator[bytes], marker: bytes, seen: bytearray) -> bytes:
    """Reads a stream until `marker` has appeared; returns everything seen so far."""
    while marker not in seen:
        seen += await anext(chunks)
    return bytes(seen)
