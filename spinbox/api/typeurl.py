"""Packing messages into google.protobuf.Any the way containerd names them.

containerd's typeurl names a protobuf message it has no registration for by
its full proto name alone, with no "type.googleapis.com/" prefix: a task
exit event travels as Any{type_url: "containerd.events.TaskExit"}. Python's
Any.Pack would add the prefix, so events and stats are packed here.
"""

from __future__ import annotations

import time
from typing import TypeVar

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from spinbox.api.proto.containerd.events import task_pb2 as events_task_pb2
from spinbox.api.proto.containerd.services.ttrpc.events.v1 import events_pb2 as events_ttrpc_pb2

M = TypeVar("M", bound=Message)

# Type URLs of the OCI runtime-spec structures containerd sends as JSON.
OCI_SPEC = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
OCI_PROCESS = "types.containerd.io/opencontainers/runtime-spec/1/Process"
OCI_LINUX_RESOURCES = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"

# The topic containerd files each task event under.
TOPICS: dict[type[Message], str] = {
    events_task_pb2.TaskCreate: "/tasks/create",
    events_task_pb2.TaskStart: "/tasks/start",
    events_task_pb2.TaskDelete: "/tasks/delete",
    events_task_pb2.TaskExit: "/tasks/exit",
    events_task_pb2.TaskOOM: "/tasks/oom",
    events_task_pb2.TaskExecAdded: "/tasks/exec-added",
    events_task_pb2.TaskExecStarted: "/tasks/exec-started",
    events_task_pb2.TaskPaused: "/tasks/paused",
    events_task_pb2.TaskResumed: "/tasks/resumed",
    events_task_pb2.TaskCheckpointed: "/tasks/checkpointed",
}


def type_url(message: Message | type[Message]) -> str:
    return str(message.DESCRIPTOR.full_name)


def pack(message: Message) -> any_pb2.Any:
    """An Any holding message, named as containerd names it."""
    return any_pb2.Any(type_url=type_url(message), value=message.SerializeToString())


def unpack(value: any_pb2.Any, message_type: type[M]) -> M:
    """The message inside value; ValueError if it holds another type.
    Accepts the name with or without a URL prefix."""
    name = value.type_url.rsplit("/", 1)[-1]
    if name != message_type.DESCRIPTOR.full_name:
        raise ValueError(
            f"expected a {message_type.DESCRIPTOR.full_name}, got {value.type_url or 'an empty Any'}"
        )
    return message_type.FromString(value.value)


def topic(event: Message) -> str:
    try:
        return TOPICS[type(event)]
    except KeyError:
        raise ValueError(f"{type_url(event)} is not a task event") from None


def envelope(namespace: str, event: Message, timestamp_ns: int | None = None) -> events_ttrpc_pb2.Envelope:
    """The envelope for publishing a task event to containerd."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(time.time_ns() if timestamp_ns is None else timestamp_ns)
    return events_ttrpc_pb2.Envelope(
        timestamp=stamp, namespace=namespace, topic=topic(event), event=pack(event)
    )
