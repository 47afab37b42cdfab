"""The VM's own requests to the guest agent over the control channel: Ping and Shutdown.

The channel is a virtio-serial port whose host end takes one connection at a
time, and spinboxd makes its own requests on it too; so each request here is a
session of its own, closed as soon as it is answered. The guest tells one host
connection from the next only once it has seen the previous one end: a session
opened right after another may be taken for its continuation and refused
("stream ids must increase"), and is retried shortly after.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from spinbox.agent import CALL_TIMEOUT, AgentClient
from spinbox.ttrpc import Code, TtrpcError

T = TypeVar("T")

ATTEMPTS = 5
RETRY_DELAY = 0.2

# Control channels whose last session may have left the guest writing: one whose
# session failed or was cancelled, or that this process did not open itself (a
# re-adopted VM). The next session there reads past the guest's late answers first
# (AgentClient.fence).
_unsettled: set[str] = set()


def unsettled(address: str) -> None:
    """The channel at `address` may carry answers meant for an earlier connection."""
    _unsettled.add(address)


def forget(address: str) -> None:
    """The channel at `address` is gone (its VM ended)."""
    _unsettled.discard(address)


def connection_lost(error: BaseException) -> bool:
    return isinstance(error, (OSError, EOFError)) or (
        isinstance(error, TtrpcError) and error.code == Code.UNAVAILABLE
    )


def _taken_for_previous_session(error: BaseException) -> bool:
    return (
        isinstance(error, TtrpcError)
        and error.code == Code.INVALID_ARGUMENT
        and "stream ids" in error.message
    )


async def session(
    address: str, call: Callable[[AgentClient], Awaitable[T]], call_timeout: float = CALL_TIMEOUT
) -> T:
    """Run call on a fresh connection to the agent, retrying sessions the guest took for an old one.
    Each agent call has `call_timeout` seconds (see spinbox.vm.agent.AgentClient.deadline)."""
    for attempt in range(ATTEMPTS):
        agent = await AgentClient.connect(address, call_timeout)
        try:
            if address in _unsettled:
                await agent.fence()
                _unsettled.discard(address)
            return await call(agent)
        except TtrpcError as error:
            _unsettled.add(address)
            if not _taken_for_previous_session(error) or attempt == ATTEMPTS - 1:
                raise
        except BaseException:
            _unsettled.add(address)
            raise
        finally:
            with contextlib.suppress(Exception):
                await agent.close()
        await asyncio.sleep(RETRY_DELAY)
    raise AssertionError("unreachable")


async def ping(address: str) -> dict[str, int]:
    """Ask the agent for Ping; return its boot timeline (CLOCK_BOOTTIME ns by phase)."""

    async def call(agent: AgentClient) -> dict[str, int]:
        response = await agent.ping()
        return {str(name): int(ns) for name, ns in response.timeline.items()}

    return await session(address, call)


async def shutdown(address: str) -> None:
    """Ask the agent to shut the guest down in order; a lost connection means it powered off."""
    try:
        await session(address, lambda agent: agent.shutdown())
    except Exception as error:
        if not connection_lost(error):
            raise
