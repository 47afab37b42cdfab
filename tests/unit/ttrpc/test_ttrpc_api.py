"""spinbox/api: our .proto files against containerd's, descriptor-driven
service registration, and Any packing for events."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, empty_pb2, symbol_database

from spinbox.api import typeurl
from spinbox.api.proto import agent_pb2
from spinbox.api.proto.containerd.cgroups.v2 import metrics_pb2 as cgroups_v2_metrics_pb2
from spinbox.api.proto.containerd.events import task_pb2 as events_task_pb2
from spinbox.api.proto.containerd.services.ttrpc.events.v1 import events_pb2 as events_ttrpc_pb2
from spinbox.api.proto.containerd.task.v2 import shim_pb2
from spinbox.api.proto.containerd.task.v3 import shim_pb2 as shim_v3_pb2
from spinbox.api.proto.containerd.types.task import task_pb2 as task_types_pb2
from spinbox.ttrpc import CallContext, Client, Code, Server, TtrpcError
from spinbox.ttrpc.server import streaming
from tests.unit.ttrpc.echo_service import run

GOCODE = Path("/usr/share/gocode/src")
CONTAINERD_PROTOS = [
    "github.com/containerd/containerd/runtime/v2/task/shim.proto",
    "github.com/containerd/containerd/api/events/task.proto",
    "github.com/containerd/containerd/api/services/ttrpc/events/v1/events.proto",
    "github.com/containerd/cgroups/v2/stats/metrics.proto",
]
PACKAGES = (
    "containerd.task.v2",
    "containerd.types",
    "containerd.v1.types",
    "containerd.events",
    "containerd.services.events.ttrpc.v1",
    "io.containerd.cgroups.v2",
)


def containerd_descriptors(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    if not all((GOCODE / p).exists() for p in CONTAINERD_PROTOS):
        pytest.skip("containerd's .proto files are not installed (golang-github-containerd-containerd-dev)")
    out = tmp_path / "containerd.pb"
    gogo = GOCODE / "github.com/gogo/protobuf"
    subprocess.run(
        ["protoc", f"-I{GOCODE}", f"-I{gogo}", f"-I{gogo}/protobuf", "-I/usr/include",
         "--include_imports", f"--descriptor_set_out={out}", *CONTAINERD_PROTOS],
        check=True, cwd=GOCODE,
    )  # fmt: skip
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def walk(
    prefix: str, messages: list[descriptor_pb2.DescriptorProto]
) -> dict[str, descriptor_pb2.DescriptorProto]:
    found = {}
    for message in messages:
        name = f"{prefix}.{message.name}"
        found[name] = message
        found.update(walk(name, list(message.nested_type)))
    return found


def test_messages_match_containerd_field_for_field(tmp_path: Path) -> None:
    pool = symbol_database.Default().pool
    theirs: dict[str, descriptor_pb2.DescriptorProto] = {}
    for file in containerd_descriptors(tmp_path).file:
        if file.package in PACKAGES:
            theirs.update(walk(file.package, list(file.message_type)))
    assert len(theirs) > 50
    for name, message in theirs.items():
        ours = descriptor_pb2.DescriptorProto()
        pool.FindMessageTypeByName(name).CopyToProto(ours)
        our_fields = {f.number: (f.name, f.type, f.label, f.type_name) for f in ours.field}
        for field in message.field:
            assert our_fields.get(field.number) == (field.name, field.type, field.label, field.type_name), (
                f"{name} field {field.number} ({field.name}) differs from containerd's"
            )


def test_task_service_has_every_method_under_both_names() -> None:
    methods = [
        "State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill",
        "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown",
    ]  # fmt: skip
    v2 = shim_pb2.DESCRIPTOR.services_by_name["Task"]
    v3 = shim_v3_pb2.DESCRIPTOR.services_by_name["Task"]
    assert (v2.full_name, v3.full_name) == ("containerd.task.v2.Task", "containerd.task.v3.Task")
    for service in (v2, v3):
        assert sorted(m.name for m in service.methods) == sorted(methods)
        for m in service.methods:
            assert m.input_type is v2.methods_by_name[m.name].input_type


class FakeTask:
    async def Connect(self, req: shim_pb2.ConnectRequest, ctx: CallContext) -> shim_pb2.ConnectResponse:
        return shim_pb2.ConnectResponse(shim_pid=42, task_pid=7, version=ctx.service)

    async def Kill(self, req: shim_pb2.KillRequest, ctx: CallContext) -> empty_pb2.Empty:
        raise TtrpcError(Code.NOT_FOUND, f"no process {req.exec_id or req.id}")

    async def State(self, req: shim_pb2.StateRequest, ctx: CallContext) -> shim_pb2.StateResponse:
        return shim_pb2.StateResponse(id=req.id, status=task_types_pb2.RUNNING)


def test_add_service_serves_v2_and_v3(tmp_path: Path) -> None:
    async def main() -> None:
        server = Server()
        v2 = shim_pb2.DESCRIPTOR.services_by_name["Task"]
        server.add_service(v2, FakeTask())
        server.add_service(v2, FakeTask(), name="containerd.task.v3.Task")
        await server.serve_unix(tmp_path / "shim.sock")
        client = await Client.connect_unix(tmp_path / "shim.sock")
        for name in ("containerd.task.v2.Task", "containerd.task.v3.Task"):
            resp = await client.call(
                name, "Connect", shim_pb2.ConnectRequest(id="c"), shim_pb2.ConnectResponse
            )
            assert (resp.shim_pid, resp.task_pid, resp.version) == (42, 7, name)
            state = await client.call(name, "State", shim_pb2.StateRequest(id="c"), shim_pb2.StateResponse)
            assert state.status == task_types_pb2.RUNNING
            with pytest.raises(TtrpcError) as err:
                await client.call(name, "Kill", shim_pb2.KillRequest(id="c", exec_id="e"), empty_pb2.Empty)
            assert (err.value.code, err.value.message) == (Code.NOT_FOUND, "no process e")
            with pytest.raises(TtrpcError) as err:
                await client.call(name, "Pause", shim_pb2.PauseRequest(id="c"), empty_pb2.Empty)
            assert err.value.code is Code.UNIMPLEMENTED
        await client.close()
        await server.close()

    run(main)


class FlaglessMethod:
    """A method descriptor as protobuf's upb backend (4.21) has it: no streaming flags."""

    def __init__(self, method: Any) -> None:
        self.method = method

    def CopyToProto(self, proto: descriptor_pb2.MethodDescriptorProto) -> None:
        self.method.CopyToProto(proto)


def test_streaming_is_read_from_the_method_proto_where_the_descriptor_lacks_it() -> None:
    agent = agent_pb2.DESCRIPTOR.services_by_name["Agent"].methods_by_name
    expected = {"Wait": (False, False), "ReadOutput": (False, True), "WriteInput": (True, False)}
    for name, flags in expected.items():
        assert streaming(agent[name]) == flags
        assert streaming(FlaglessMethod(agent[name])) == flags  # type: ignore[arg-type]


def test_events_pack_with_containerd_type_urls() -> None:
    exit_event = events_task_pb2.TaskExit(container_id="c1", id="c1", pid=9, exit_status=137)
    env = typeurl.envelope("default", exit_event, timestamp_ns=1_700_000_000_123_456_789)
    assert env.topic == "/tasks/exit"
    assert env.namespace == "default"
    assert env.event.type_url == "containerd.events.TaskExit"
    assert env.timestamp.ToNanoseconds() == 1_700_000_000_123_456_789
    assert typeurl.unpack(env.event, events_task_pb2.TaskExit) == exit_event
    assert typeurl.topic(events_task_pb2.TaskOOM()) == "/tasks/oom"
    assert typeurl.topic(events_task_pb2.TaskExecStarted()) == "/tasks/exec-started"
    metrics = typeurl.pack(cgroups_v2_metrics_pb2.Metrics())
    assert metrics.type_url == "io.containerd.cgroups.v2.Metrics"
    with pytest.raises(ValueError, match=r"expected a containerd\.events\.TaskOOM"):
        typeurl.unpack(env.event, events_task_pb2.TaskOOM)
    with pytest.raises(ValueError, match="not a task event"):
        typeurl.topic(events_ttrpc_pb2.ForwardRequest())
