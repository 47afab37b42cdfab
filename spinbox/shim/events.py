"""Task events to containerd, in the order they happened.

Every event goes through one queue and one sender, so containerd sees them in
the order the service published them (create, start, exec-added,
exec-started, paused, resumed, oom, exit, delete); the service publishes an
exit only after the process's output is drained.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from google.protobuf.message import Message

from spinbox.shim.protos import EVENTS_SERVICE, NAMESPACE_METADATA, Any, Empty, Timestamp, events_service

log = logging.getLogger(__name__)

TASK_CREATE = "/tasks/create"
TASK_START = "/tasks/start"
TASK_EXIT = "/tasks/exit"
TASK_OOM = "/tasks/oom"
TASK_DELETE = "/tasks/delete"
TASK_EXEC_ADDED = "/tasks/exec-added"
TASK_EXEC_STARTED = "/tasks/exec-started"
TASK_PAUSED = "/tasks/paused"
TASK_RESUMED = "/tasks/resumed"

Envelope = events_service.Envelope
Send = Callable[[Envelope], Awaitable[None]]


def pack(message: Message) -> Any:
    """An Any with containerd's type URL: the bare message name (typeurl's form)."""
    return Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def timestamp(at: datetime | None = None) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at or datetime.now(UTC))
    return stamp


class EventPublisher:
    """Queues events and sends them one at a time, retrying while containerd is unreachable."""

    def __init__(self, namespace: str, send: Send, retries: int = 5) -> None:
        self.namespace = namespace
        self._send = send
        self._retries = retries
        self._queue: asyncio.Queue[Envelope] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def publish(self, topic: str, event: Message) -> None:
        envelope = Envelope(timestamp=timestamp(), namespace=self.namespace, topic=topic, event=pack(event))
        self._queue.put_nowait(envelope)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            envelope = await self._queue.get()
            try:
                await self._deliver(envelope)
            finally:
                self._queue.task_done()

    async def _deliver(self, envelope: Envelope) -> None:
        delay = 0.05
        for attempt in range(self._retries):
            try:
                await self._send(envelope)
                return
            except Exception as error:
                if attempt == self._retries - 1:
                    log.error("dropping event %s: %s", envelope.topic, error)
                    return
                log.warning("sending event %s failed (%s); retrying", envelope.topic, error)
                await asyncio.sleep(delay)
                delay *= 2

    async def flush(self) -> None:
        """Returns once every event published so far has been sent (or given up on)."""
        await self._queue.join()

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            self._task = None


class TtrpcEventSender:
    """Sends envelopes to containerd's Events/Forward over ttrpc, reconnecting as needed."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self._client: object | None = None

    async def __call__(self, envelope: Envelope) -> None:
        from spinbox.ttrpc import Client

        if self._client is None:
            self._client = await Client.connect_unix(self.address)
        client = self._client
        assert isinstance(client, Client)
        request = events_service.ForwardRequest(envelope=envelope)
        try:
            await client.call(
                EVENTS_SERVICE, "Forward", request, Empty, metadata={NAMESPACE_METADATA: [self.namespace]}
            )
        except Exception:
            if client.closed:
                # containerd went away (or restarted): reconnect on the next try.
                self._client = None
            raise

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            from spinbox.ttrpc import Client

            assert isinstance(client, Client)
            await client.close()
