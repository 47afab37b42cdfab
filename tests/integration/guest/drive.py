"""Driving the guest agent through AgentClient the way the shim does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from spinbox.agent import AgentClient
from spinbox.api.proto import agent_pb2 as pb
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


async def terminal_session(a: AgentClient, cid: str) -> None:
    """A shell on a pty sees the window size set before it starts and a resize after."""
    spec = oci.spec("sh", "-c", "stty size; read x; stty size; exit 5", terminal=True)
    await a.create_container(cid, spec, pb.IoConfig(stdin=True, stdout=True, terminal=True))
    await a.resize_pty(cid, width=100, height=30)
    chunks = a.read_output(cid)
    seen = bytearray()
    await a.start(cid)
    await read_until(chunks, b"30 100", seen)
    await a.resize_pty(cid, width=120, height=40)
    await a.write_input(cid, feed(b"go\n"), close_stdin=False)
    await read_until(chunks, b"40 120", seen)
    assert (await a.wait(cid)).exit_status == 5
    await a.delete_process(cid)
