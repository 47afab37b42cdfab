"""Every agent call but Wait and Ping has a deadline: a guest that takes a
request and never answers fails the call with DEADLINE_EXCEEDED naming the
method, instead of a wait without end."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from spinbox.agent import CALL_TIMEOUT, AgentClient
from spinbox.api.proto import agent_pb2 as pb
from spinbox.ttrpc import Code, TtrpcError
from spinbox.vm import control


def test_deadlines_by_method() -> None:
    agent = AgentClient(client=None, call_timeout=10)  # type: ignore[arg-type]
    assert agent.deadline("ConfigureNetwork") == 10
    assert agent.deadline("CreateContainer") == 10
    assert agent.deadline("SyncRootfs") == 50
    assert agent.deadline("Wait") is None
    assert agent.deadline("Ping") is None
    assert AgentClient(client=None).deadline("Start") == CALL_TIMEOUT  # type: ignore[arg-type]


def test_a_guest_that_never_answers_fails_the_call_at_its_deadline(tmp_path: Path) -> None:
    async def scenario() -> None:
        held: list[asyncio.StreamWriter] = []

        async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)

        socket = tmp_path / "control.sock"
        server = await asyncio.start_unix_server(never_answer, path=str(socket))
        try:
            started = time.monotonic()

            async def configure(agent: AgentClient) -> None:
                await agent.configure_network(pb.NetworkConfig())

            with pytest.raises(TtrpcError) as raised:
                await asyncio.wait_for(control.session(f"unix:{socket}", configure, call_timeout=0.3), 10)
            assert raised.value.code == Code.DEADLINE_EXCEEDED
            assert "ConfigureNetwork" in raised.value.message
            assert time.monotonic() - started < 5
        finally:
            for writer in held:
                writer.close()
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


def test_a_missed_deadline_is_told_to_the_hook_before_the_call_fails(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        held: list[asyncio.StreamWriter] = []

        async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)

        socket = tmp_path / "agent.sock"
        server = await asyncio.start_unix_server(never_answer, path=str(socket))
        told: list[str] = []
        agent = await AgentClient.connect(f"unix:{socket}", call_timeout=0.2)
        agent.on_deadline = told.append
        try:
            with pytest.raises(TtrpcError) as raised:
                await agent.signal("c1", 15)
            assert raised.value.code == Code.DEADLINE_EXCEEDED
            assert told == [raised.value.message]
        finally:
            await agent.close()
            for writer in held:
                writer.close()
            server.close()
            await server.wait_closed()
        return told

    (message,) = asyncio.run(scenario())
    assert message == "spinbox.agent.v1.Agent/Signal: the guest did not answer within 0.2 s"
