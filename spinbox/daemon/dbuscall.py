"""One method call from spinboxd on its bus (dbus_fast), within a deadline: TimeoutError past it."""

from __future__ import annotations

import asyncio
from typing import Any

from dbus_fast import Message
from dbus_fast.aio.message_bus import MessageBus


async def call(
    bus: MessageBus,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str,
    body: list[Any],
    seconds: float,
) -> Message:
    message = Message(
        destination=destination,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=body,
    )
    # Not asyncio.wait_for: on Python 3.11 it drops a cancellation that comes as the reply
    # does, and a caller past its deadline would then run on.
    async with asyncio.timeout(seconds):
        reply = await bus.call(message)
    assert reply is not None  # None only for a call that asks for no reply
    return reply
