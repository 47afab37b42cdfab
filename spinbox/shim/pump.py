"""Moves a process's stdio between the host (containerd's FIFOs, log
drivers) and the guest agent: output from creation on, stdin once started."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from spinbox.api.proto import agent_pb2
from spinbox.shim.container import Agent, ProcessState
from spinbox.shim.process import Process
from spinbox.shim.stdio import Kind, ProcessIO, Sink, StdioConfig, read_fifo

log = logging.getLogger(__name__)


async def open_stdio(
    state: ProcessState, stdio: StdioConfig, container_id: str, namespace: str
) -> agent_pb2.IoConfig:
    """Opens the host ends of a process's stdio (into state.io); returns which ends the guest makes."""
    state.io = await ProcessIO.open(stdio, container_id, namespace)
    terminal = state.process.terminal
    return agent_pb2.IoConfig(
        stdin=stdio.stdin.kind == Kind.FIFO,
        stdout=state.io.stdout is not None,
        stderr=state.io.stderr is not None and not terminal,
        terminal=terminal,
    )


def start_output(agent: Agent, state: ProcessState) -> None:
    """Output is read from creation on (the agent holds it until a reader comes)."""
    loop = asyncio.get_running_loop()
    proc, io = state.process, state.io
    assert io is not None
    streams = [
        ("stdout", agent_pb2.STDOUT, io.stdout),
        ("stderr", agent_pb2.STDERR, None if proc.terminal else io.stderr),
    ]
    for name, stream, sink in streams:
        if sink is not None:
            state.outputs.append(loop.create_task(copy_output(agent, proc, stream, sink), name=name))


def start_input(agent: Agent, state: ProcessState, fifo: str) -> None:
    """stdin is forwarded once the process has started."""
    state.stdin = asyncio.get_running_loop().create_task(copy_input(agent, state.process, fifo))


async def copy_output(agent: Agent, proc: Process, stream: agent_pb2.OutputStream, sink: Sink) -> None:
    try:
        async for data in agent.read_output(proc.container_id, proc.exec_id, stream):
            await sink.write(data)
    except asyncio.CancelledError:
        raise
    except Exception as error:
        log.warning("output of %s ended early: %s", proc.name, error)


async def copy_input(agent: Agent, proc: Process, path: str) -> None:
    try:
        await agent.write_input(proc.container_id, read_fifo(path), exec_id=proc.exec_id, close_stdin=True)
    except asyncio.CancelledError:
        raise
    except Exception as error:
        log.warning("stdin of %s ended early: %s", proc.name, error)


async def stop(state: ProcessState) -> None:
    """Cancels the process's copying and closes its host-side stdio."""
    for copier in [*state.outputs, state.stdin]:
        if copier is not None and not copier.done():
            copier.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await copier
    if state.io is not None:
        await state.io.close()
