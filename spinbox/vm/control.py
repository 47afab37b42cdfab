"""spinboxd's two requests to the guest agent over the control channel: Ping and Shutdown."""

from __future__ import annotations

import asyncio
import importlib
from typing import Any


def _agent_client() -> Any:
    # spinbox.vm.agent (the typed client) is imported lazily: the VM layer works
    # without the ttrpc stack until a caller asks the agent for something.
    return importlib.import_module("spinbox.vm.agent").AgentClient


async def ping(address: str) -> dict[str, int]:
    """Ask the agent for Ping; return its boot timeline (CLOCK_BOOTTIME ns by phase)."""
    client = await _agent_client().connect(address)
    try:
        response = await client.ping()
        return {str(name): int(ns) for name, ns in response.timeline.items()}
    finally:
        await client.close()


async def request_shutdown(address: str, timeout: float) -> None:  # noqa: ASYNC109
    """Ask the agent to shut the guest down in order; the reply may not arrive (it powers off)."""
    client = await asyncio.wait_for(_agent_client().connect(address), timeout)
    try:
        await asyncio.wait_for(client.shutdown(), timeout)
    finally:
        await client.close()
