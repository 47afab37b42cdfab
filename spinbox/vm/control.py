"""spinboxd's connection to the guest agent over the control channel.

A virtio-serial port's host end takes one connection at a time, and each new
connection is a new session for the guest to notice, so the VM keeps one
connection open and every control request (Ping, Shutdown, and the daemon's
own) goes over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from typing import Any

UNAVAILABLE = 14  # ttrpc's Code.UNAVAILABLE: the connection was lost


def _agent_client() -> Any:
    # spinbox.vm.agent (the typed client) is imported lazily: the VM layer works
    # without the ttrpc stack until a caller asks the agent for something.
    return importlib.import_module("spinbox.vm.agent").AgentClient


def connection_lost(error: BaseException) -> bool:
    return isinstance(error, (OSError, EOFError)) or getattr(error, "code", None) == UNAVAILABLE


class ControlChannel:
    """One lazily (re)connected AgentClient on the control address."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def client(self) -> Any:
        """The connected AgentClient (spinbox.vm.agent), connecting if needed."""
        async with self._lock:
            if self._client is None:
                self._client = await _agent_client().connect(self.address)
            return self._client

    async def ping(self) -> dict[str, int]:
        """Ask the agent for Ping; return its boot timeline (CLOCK_BOOTTIME ns by phase)."""
        try:
            response = await (await self.client()).ping()
        except Exception as error:
            if connection_lost(error):
                await self.close()
            raise
        return {str(name): int(ns) for name, ns in response.timeline.items()}

    async def shutdown(self) -> None:
        """Ask the agent to shut the guest down in order; a lost connection means it powered off."""
        try:
            await (await self.client()).shutdown()
        except Exception as error:
            await self.close()
            if not connection_lost(error):
                raise

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
