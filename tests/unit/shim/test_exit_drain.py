"""A process's exit waits for its buffered output, but never for a pipe that a process it
started keeps open: the drain has a deadline, and what it cut is named in the log."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from spinbox.api.proto import agent_pb2
from spinbox.shim import exits
from spinbox.shim.container import ProcessState
from spinbox.shim.process import Process


class Agent:
    async def wait(self, container_id: str, exec_id: str) -> agent_pb2.WaitResponse:
        response = agent_pb2.WaitResponse(exit_status=137)
        response.exited_at.FromDatetime(datetime.now(UTC))
        return response


class Publisher:
    def __init__(self) -> None:
        self.topics: list[str] = []

    def publish(self, topic: str, event: Any) -> None:
        self.topics.append(topic)


def test_output_written_before_the_exit_arrives_first() -> None:
    async def main() -> list[str]:
        order: list[str] = []

        async def copy() -> None:
            await asyncio.sleep(0.2)
            order.append("output")

        loop = asyncio.get_running_loop()
        state = ProcessState(Process("c1", "", pid=7))
        state.outputs.append(loop.create_task(copy(), name="stdout"))
        publisher = Publisher()
        await exits.watch_exit(SimpleNamespace(agent=Agent()), state, publisher)  # type: ignore[arg-type]
        order.extend(publisher.topics)
        assert state.process.exit is not None and state.process.exit.status == 137
        return order

    assert asyncio.run(main()) == ["output", "/tasks/exit"]


def test_a_pipe_held_open_by_a_survivor_is_cut_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(exits, "DRAIN_WAIT", 0.3)

    async def main() -> tuple[float, ProcessState, Publisher, list[asyncio.Task[None]]]:
        async def held_open() -> None:
            await asyncio.Event().wait()  # the survivor never closes its stdout

        async def done() -> None:
            pass

        loop = asyncio.get_running_loop()
        state = ProcessState(Process("c1", "", pid=7))
        copiers = [loop.create_task(held_open(), name="stdout"), loop.create_task(done(), name="stderr")]
        state.outputs.extend(copiers)
        publisher = Publisher()
        start = time.monotonic()
        await exits.watch_exit(SimpleNamespace(agent=Agent()), state, publisher)  # type: ignore[arg-type]
        return time.monotonic() - start, state, publisher, copiers

    with caplog.at_level(logging.WARNING, logger="spinbox.shim.exits"):
        took, state, publisher, copiers = asyncio.run(main())
    assert 0.3 <= took < 2
    assert publisher.topics == ["/tasks/exit"]
    assert state.process.exit is not None
    assert copiers[0].cancelled() and not copiers[1].cancelled()
    [record] = [r for r in caplog.records if "stayed open" in r.getMessage()]
    assert record.getMessage().startswith("container 'c1' exited, but its stdout stayed open 0.3 s later")
