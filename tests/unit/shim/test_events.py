"""Events leave in the order they were published, even when sending fails for a while."""

from __future__ import annotations

import asyncio

from spinbox.shim import events as topics
from spinbox.shim.events import Envelope, EventPublisher, pack
from spinbox.shim.protos import events


def test_events_keep_their_order_across_retries() -> None:
    sent: list[str] = []
    failures = {"count": 2}

    async def send(envelope: Envelope) -> None:
        if envelope.topic == topics.TASK_START and failures["count"]:
            failures["count"] -= 1
            raise ConnectionError("containerd restarting")
        await asyncio.sleep(0)
        sent.append(envelope.topic)

    async def scenario() -> None:
        publisher = EventPublisher("default", send)
        publisher.publish(topics.TASK_CREATE, events.TaskCreate(container_id="c1"))
        publisher.publish(topics.TASK_START, events.TaskStart(container_id="c1", pid=1))
        publisher.publish(topics.TASK_EXIT, events.TaskExit(container_id="c1", exit_status=3))
        publisher.publish(topics.TASK_DELETE, events.TaskDelete(container_id="c1"))
        await publisher.close()

    asyncio.run(scenario())
    assert sent == [topics.TASK_CREATE, topics.TASK_START, topics.TASK_EXIT, topics.TASK_DELETE]


def test_envelope_carries_namespace_and_typeurl() -> None:
    captured: list[Envelope] = []

    async def send(envelope: Envelope) -> None:
        captured.append(envelope)

    async def scenario() -> None:
        publisher = EventPublisher("k8s.io", send)
        publisher.publish(topics.TASK_OOM, events.TaskOOM(container_id="c1"))
        await publisher.close()

    asyncio.run(scenario())
    (envelope,) = captured
    assert envelope.namespace == "k8s.io"
    assert envelope.topic == "/tasks/oom"
    assert envelope.event.type_url == "containerd.events.TaskOOM"
    decoded = events.TaskOOM.FromString(envelope.event.value)
    assert decoded.container_id == "c1"
    assert pack(decoded).type_url == "containerd.events.TaskOOM"
