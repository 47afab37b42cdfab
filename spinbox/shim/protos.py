"""The containerd messages the shim speaks, under short names."""

from __future__ import annotations

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2

from spinbox.api.proto.containerd.events import task_pb2 as events
from spinbox.api.proto.containerd.services.ttrpc.events.v1 import events_pb2 as events_service
from spinbox.api.proto.containerd.task.v2 import shim_pb2 as task
from spinbox.api.proto.containerd.types import mount_pb2 as mount
from spinbox.api.proto.containerd.types.task import task_pb2 as task_types

Any = any_pb2.Any
Empty = empty_pb2.Empty
Timestamp = timestamp_pb2.Timestamp

TASK_SERVICES = ("containerd.task.v2.Task", "containerd.task.v3.Task")
EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_METADATA = "containerd-namespace-ttrpc"

__all__ = [
    "EVENTS_SERVICE",
    "NAMESPACE_METADATA",
    "TASK_SERVICES",
    "Any",
    "Empty",
    "Timestamp",
    "events",
    "events_service",
    "mount",
    "task",
    "task_types",
]
