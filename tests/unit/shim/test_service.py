"""The Task service's semantics against a stand-in guest agent and spinboxd:
event order, exit after drained output, error codes, and cleanup of failed
creates. (Real containerd, spinboxd and guests are exercised in tests/e2e.)"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from spinbox.api.proto import agent_pb2
from spinbox.busclient import SpinboxdError
from spinbox.shim import events as topics
from spinbox.shim import released
from spinbox.shim.errors import ShimError
from spinbox.shim.guestspec import for_guest
from spinbox.shim.guestwatch import GuestWatch
from spinbox.shim.protos import Any as AnyMessage
from spinbox.shim.protos import task
from spinbox.shim.service import TaskService
from spinbox.shim.spinboxd import VmInfo, VmRequest, vm_id_for


class FakeAgent:
    """A guest whose container prints `output` slowly and exits with `status` when signalled."""

    def __init__(self, output: list[bytes], status: int = 0, fail_create: str = "") -> None:
        self.output = output
        self.status = status
        self.fail_create = fail_create
        self.spec: dict[str, Any] = {}
        self.exited = asyncio.Event()
        self.signals: list[tuple[int, bool]] = []
        self.closed = False
        self.updates: list[dict[str, Any]] = []
        self.on_deadline: Any = None

    async def close(self) -> None:
        self.closed = True

    async def create_container(
        self, container_id: str, spec: bytes, io: Any = None, shared: Any = (), apparmor_policy: bytes = b""
    ) -> int:
        if self.fail_create:
            raise ShimError("FAILED_PRECONDITION", self.fail_create)
        self.spec = json.loads(spec)
        return 7

    async def start(self, container_id: str, exec_id: str = "") -> int:
        return 7

    async def signal(self, container_id: str, signal: int, exec_id: str = "", all: bool = False) -> None:
        self.signals.append((signal, all))
        self.status = 128 + signal
        self.exited.set()

    async def wait(self, container_id: str, exec_id: str = "") -> agent_pb2.WaitResponse:
        await self.exited.wait()
        response = agent_pb2.WaitResponse(pid=7, exit_status=self.status)
        response.exited_at.FromDatetime(datetime.now(UTC))
        return response

    async def read_output(
        self, container_id: str, exec_id: str = "", stream: int = 0
    ) -> AsyncIterator[bytes]:
        if stream != agent_pb2.STDOUT:
            return
        await self.exited.wait()
        for chunk in self.output:
            await asyncio.sleep(0.001)
            yield chunk

    async def write_input(self, container_id: str, data: AsyncIterable[bytes], **kw: Any) -> None:
        async for _ in data:
            pass

    async def events(self) -> AsyncIterator[agent_pb2.Event]:
        await asyncio.Event().wait()
        yield agent_pb2.Event()

    async def delete_container(self, container_id: str) -> None:
        pass

    async def pause(self, container_id: str) -> None:
        pass

    async def resume(self, container_id: str) -> None:
        pass

    async def stats(self, container_id: str) -> bytes:
        return b"\x0a\x00"

    async def update_resources(self, container_id: str, resources: bytes) -> None:
        self.updates.append(json.loads(resources))


class FakeSpinboxd:
    def __init__(self, fail: SpinboxdError | None = None) -> None:
        self.fail = fail
        self.requests: list[VmRequest] = []
        self.live: set[str] = set()
        self.calls: list[str] = []
        # Each VM's (vcpus, memory-mib): it booted with 1 and 512.
        self.sizes: dict[str, tuple[int, int]] = {}

    async def create_vm(self, request: VmRequest) -> VmInfo:
        if self.fail:
            raise self.fail
        self.requests.append(request)
        self.live.add(request.vm_id)
        return VmInfo(f"/org/spinstack/Spinbox/vm/{request.vm_id}", "unix:/agent", "/run/rootfs", 4242)

    async def prepare_network_namespace(self, vm_id: str) -> tuple[str, int]:
        return "/run/netns/x", 4343

    async def open_port_forward(self, path: str) -> int:
        self.calls.append(f"OpenPortForward {path}")
        return socket.create_server(("127.0.0.1", 0)).detach()

    async def get_vm(self, vm_id: str) -> str | None:
        return vm_id if vm_id in self.live else None

    async def vm_call(self, path: str, member: str, signature: str = "", body: Any = ()) -> None:
        self.calls.append(member)

    async def add_rootfs(self, path: str, container_id: str, mounts: Any) -> str:
        self.calls.append(f"AddRootfs {path} {container_id}")
        return f"/run/rootfs/{container_id}"

    async def remove_rootfs(self, path: str, container_id: str) -> None:
        self.calls.append(f"RemoveRootfs {path} {container_id}")

    async def stop_vm(self, vm_id: str, timeout_ms: int, *, kill: bool = False, wait: float = 120) -> None:
        self.live.discard(vm_id)

    async def vm_resources(self, path: str) -> dict[str, Any]:
        vcpus, memory = self.sizes.get(path, (1, 512))
        return {"vcpus": vcpus, "memory-mib": memory, "boot-vcpus": 1, "boot-memory-mib": 512}

    async def resize_vm(self, path: str, vcpus: int, memory_mib: int) -> dict[str, Any]:
        if self.fail:
            raise self.fail
        self.calls.append(f"Resize {path} {vcpus} {memory_mib}")
        self.sizes[path] = (vcpus, memory_mib)
        return await self.vm_resources(path)


class Recorder:
    def __init__(self, log: Path) -> None:
        self.log = log
        self.topics: list[str] = []
        self.output_at_exit = b""

    def publish(self, topic: str, event: Message) -> None:
        self.topics.append(topic)
        if topic == topics.TASK_EXIT:
            self.output_at_exit = self.log.read_bytes()


def make_bundle(tmp_path: Path, **annotations: str) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    spec = {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"]},
        "annotations": annotations,
        "linux": {"resources": {"memory": {"limit": 128 * 1024 * 1024}}},
        "hooks": {"createContainer": [{"path": "/bin/true"}]},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def make_service(agent: FakeAgent, spinboxd: FakeSpinboxd, recorder: Recorder) -> TaskService:
    async def connect_spinboxd() -> FakeSpinboxd:
        return spinboxd

    async def connect_agent(address: str) -> FakeAgent:
        return agent

    return TaskService("default", recorder, connect_spinboxd, connect_agent)  # type: ignore[arg-type]


def create_request(bundle: Path, log: Path) -> task.CreateTaskRequest:
    return task.CreateTaskRequest(id="c1", bundle=str(bundle), stdout=f"file://{log}", stderr=f"file://{log}")


def test_lifecycle_events_in_order_and_exit_after_output(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    bundle = make_bundle(tmp_path)
    recorder = Recorder(log)
    spinboxd = FakeSpinboxd()
    agent = FakeAgent([b"a" * 1000, b"b" * 1000, b"end\n"])

    async def scenario() -> tuple[task.WaitResponse, task.DeleteResponse]:
        service = make_service(agent, spinboxd, recorder)
        (bundle / released.NAME).touch()  # an earlier container's record speaks not for this one
        created = await service.create(create_request(bundle, log))
        assert not released.marked(str(bundle))
        assert created.pid == 4242
        await service.start(task.StartRequest(id="c1"))
        await service.pause(task.PauseRequest(id="c1"))
        await service.resume(task.ResumeRequest(id="c1"))
        stats = await service.stats(task.StatsRequest(id="c1"))
        assert stats.stats.type_url == "io.containerd.cgroups.v2.Metrics"
        await service.kill(task.KillRequest(id="c1", signal=15))
        waited = await service.wait(task.WaitRequest(id="c1"))
        deleted = await service.delete(task.DeleteRequest(id="c1"))
        assert not service.containers
        return waited, deleted

    waited, deleted = asyncio.run(scenario())
    assert waited.exit_status == 143 and deleted.exit_status == 143
    assert recorder.topics == [
        topics.TASK_CREATE,
        topics.TASK_START,
        topics.TASK_PAUSED,
        topics.TASK_RESUMED,
        topics.TASK_EXIT,
        topics.TASK_DELETE,
    ]
    assert recorder.output_at_exit == b"a" * 1000 + b"b" * 1000 + b"end\n"
    assert spinboxd.calls == ["SyncRootfs"]
    assert not spinboxd.live
    # containerd's `delete` that follows the shim's end need not ask spinboxd.
    assert released.marked(str(bundle))
    # Host hooks leave the spec; the guest's own stay.
    assert agent.spec["hooks"] == {"createContainer": [{"path": "/bin/true"}]}
    (request,) = spinboxd.requests
    assert request.vm_id == "default-c1" and request.memory_mib == 128 + 128
    # A call into this guest that misses its deadline has spinboxd record where it is.
    watch = agent.on_deadline
    assert isinstance(watch, GuestWatch)
    assert (watch.vm_id, watch.vm_path) == ("default-c1", "/org/spinstack/Spinbox/vm/default-c1")


def test_failed_create_leaves_no_vm(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    spinboxd = FakeSpinboxd()
    agent = FakeAgent([], fail_create='exec: "/nope": no such file or directory')

    async def scenario() -> None:
        service = make_service(agent, spinboxd, Recorder(log))
        await service.create(create_request(make_bundle(tmp_path), log))

    with pytest.raises(ShimError, match="no such file") as caught:
        asyncio.run(scenario())
    assert caught.value.code == "FAILED_PRECONDITION"
    assert spinboxd.requests and not spinboxd.live
    assert agent.closed


def test_bad_annotation_is_invalid_argument_before_any_vm(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    spinboxd = FakeSpinboxd()

    async def scenario() -> None:
        service = make_service(FakeAgent([]), spinboxd, Recorder(log))
        await service.create(create_request(make_bundle(tmp_path, **{"io.spinbox.vcpu": "2"}), log))

    with pytest.raises(ShimError, match=r"unknown annotation io\.spinbox\.vcpu") as caught:
        asyncio.run(scenario())
    assert caught.value.code == "INVALID_ARGUMENT"
    assert not spinboxd.requests


def test_spinboxd_errors_keep_their_meaning(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    spinboxd = FakeSpinboxd(fail=SpinboxdError("org.spinstack.Spinbox.Error.InvalidArgument", "rootfs: bad"))

    async def scenario() -> None:
        service = make_service(FakeAgent([]), spinboxd, Recorder(log))
        await service.create(create_request(make_bundle(tmp_path), log))

    with pytest.raises(ShimError, match="rootfs: bad") as caught:
        asyncio.run(scenario())
    assert caught.value.code == "INVALID_ARGUMENT"


def test_error_codes_for_unknown_and_running_tasks(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    bundle = make_bundle(tmp_path)

    async def scenario() -> dict[str, str]:
        agent = FakeAgent([])
        service = make_service(agent, FakeSpinboxd(), Recorder(log))
        codes: dict[str, str] = {}

        async def code_of(name: str, call: Any) -> None:
            try:
                await call
            except ShimError as error:
                codes[name] = error.code

        await code_of("state-unknown", service.state(task.StateRequest(id="nope")))
        await service.create(create_request(bundle, log))
        await code_of("create-again", service.create(create_request(bundle, log)))
        await service.start(task.StartRequest(id="c1"))
        await code_of("start-again", service.start(task.StartRequest(id="c1")))
        await code_of("delete-running", service.delete(task.DeleteRequest(id="c1")))
        await code_of("checkpoint", service.checkpoint(task.CheckpointTaskRequest(id="c1")))
        await code_of("exec-unknown", service.state(task.StateRequest(id="c1", exec_id="e9")))
        await code_of("update-empty", service.update(task.UpdateTaskRequest(id="c1", resources=AnyMessage())))
        state = await service.state(task.StateRequest(id="c1"))
        assert state.status == 2  # RUNNING
        await service.kill(task.KillRequest(id="c1", signal=9, all=True))
        await service.wait(task.WaitRequest(id="c1"))
        await code_of("kill-exited", service.kill(task.KillRequest(id="c1", signal=9)))
        await service.delete(task.DeleteRequest(id="c1"))
        assert agent.signals == [(9, True)]
        return codes

    assert asyncio.run(scenario()) == {
        "state-unknown": "NOT_FOUND",
        "create-again": "ALREADY_EXISTS",
        "start-again": "FAILED_PRECONDITION",
        "delete-running": "FAILED_PRECONDITION",
        "checkpoint": "UNIMPLEMENTED",
        "exec-unknown": "NOT_FOUND",
        "update-empty": "INVALID_ARGUMENT",
        "kill-exited": "NOT_FOUND",
    }


def test_vm_ids_fit_spinboxd_rules() -> None:
    assert vm_id_for("default", "t1") == "default-t1"
    long_id = "3c57e2f8b25817202be2fa8cb3211d77cfa543f12ed5fcf188f2425e9a1d27b6"
    vm_id = vm_id_for("default", long_id)
    assert len(vm_id) <= 64 and vm_id.startswith("default-3c57")
    assert vm_id != vm_id_for("other", long_id)
    assert vm_id == vm_id_for("default", long_id)


def test_guest_gets_a_runtime_spec_version_its_crun_reads() -> None:
    assert for_guest({"ociVersion": "1.2.1"})["ociVersion"] == "1.0.2"
    assert for_guest({"ociVersion": "1.0.2-dev"})["ociVersion"] == "1.0.2-dev"


def test_deleting_a_created_container_releases_its_waiters(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    spinboxd = FakeSpinboxd()

    async def scenario() -> int:
        service = make_service(FakeAgent([]), spinboxd, Recorder(log))
        await service.create(create_request(make_bundle(tmp_path), log))
        waiter = asyncio.create_task(service.wait(task.WaitRequest(id="c1")))
        await service.delete(task.DeleteRequest(id="c1"))
        return (await waiter).exit_status

    assert asyncio.run(scenario()) == 137
    assert not spinboxd.live


def test_a_pods_containers_share_the_sandboxs_vm(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    recorder = Recorder(log)
    spinboxd = FakeSpinboxd()
    agent = FakeAgent([])
    for name in ("sb", "app", "stray"):
        (tmp_path / name).mkdir()
    sandbox_bundle = make_bundle(tmp_path / "sb", **{"io.kubernetes.cri.sandbox-id": "sb"})
    app_bundle = make_bundle(tmp_path / "app", **{"io.kubernetes.cri.sandbox-id": "sb"})
    stray_bundle = make_bundle(tmp_path / "stray", **{"io.kubernetes.cri.sandbox-id": "elsewhere"})

    async def scenario() -> None:
        service = make_service(agent, spinboxd, recorder)
        await service.create(task.CreateTaskRequest(id="sb", bundle=str(sandbox_bundle)))
        created = await service.create(
            task.CreateTaskRequest(id="app", bundle=str(app_bundle), stdout=f"file://{log}")
        )
        assert created.pid == 4242  # the pod VM's QEMU
        with pytest.raises(ShimError) as stray:
            await service.create(task.CreateTaskRequest(id="stray", bundle=str(stray_bundle)))
        assert stray.value.code == "FAILED_PRECONDITION" and "'elsewhere'" in str(stray.value)
        await service.delete(task.DeleteRequest(id="app"))
        assert spinboxd.live == {"default-sb"} and not agent.closed
        # A container left when its sandbox goes was stopped with the pod's VM.
        await service.create(task.CreateTaskRequest(id="late", bundle=str(app_bundle)))
        await service.delete(task.DeleteRequest(id="sb"))
        assert not spinboxd.live and agent.closed
        await service.delete(task.DeleteRequest(id="late"))
        assert not service.containers

    asyncio.run(scenario())
    assert [r.vm_id for r in spinboxd.requests] == ["default-sb"]
    vm = "/org/spinstack/Spinbox/vm/default-sb"
    # The pod's VM grew by app's memory limit (128 MiB) when app joined it.
    assert spinboxd.calls == [
        f"AddRootfs {vm} app",
        f"Resize {vm} 1 640",
        f"RemoveRootfs {vm} app",
        f"AddRootfs {vm} late",
    ]


def test_a_delete_whose_vm_stop_failed_can_be_asked_again(tmp_path: Path) -> None:
    log = tmp_path / "out.log"

    class StopFailsOnce(FakeSpinboxd):
        failed = False

        async def stop_vm(
            self, vm_id: str, timeout_ms: int, *, kill: bool = False, wait: float = 120
        ) -> None:
            if not self.failed:
                self.failed = True
                raise SpinboxdError("Failed", f"VM {vm_id} was not released within 120s")
            await super().stop_vm(vm_id, timeout_ms, kill=kill, wait=wait)

    spinboxd = StopFailsOnce()
    bundle = make_bundle(tmp_path)

    async def scenario() -> None:
        service = make_service(FakeAgent([]), spinboxd, Recorder(log))
        await service.create(create_request(bundle, log))
        with pytest.raises(ShimError, match="cannot stop the VM of 'c1': VM default-c1 was not released"):
            await service.delete(task.DeleteRequest(id="c1"))
        # containerd still finds the task, and its next Delete stops the VM; until then
        # containerd's `delete` must ask spinboxd for the VM.
        assert "c1" in service.containers and "default-c1" in spinboxd.live
        assert not released.marked(str(bundle))
        await service.delete(task.DeleteRequest(id="c1"))
        assert not service.containers and not spinboxd.live
        assert released.marked(str(bundle))

    asyncio.run(scenario())


def test_a_shim_answers_for_its_latest_deleted_containers_only(tmp_path: Path) -> None:
    """containerd 2.x never shuts a pod's further containers down one by one: a
    long-lived pod's shim keeps no more than DELETED_KEPT of their records."""
    from spinbox.shim.service import DELETED_KEPT

    log = tmp_path / "out.log"
    bundle = make_bundle(tmp_path)

    async def scenario() -> TaskService:
        service = make_service(FakeAgent([]), FakeSpinboxd(), Recorder(log))
        for n in range(DELETED_KEPT + 3):
            await service.create(task.CreateTaskRequest(id=f"c{n}", bundle=str(bundle)))
            await service.delete(task.DeleteRequest(id=f"c{n}"))
        state = await service.state(task.StateRequest(id=f"c{DELETED_KEPT + 2}"))
        assert state.exit_status == 137
        with pytest.raises(ShimError, match="no container 'c0' in this shim"):
            await service.state(task.StateRequest(id="c0"))
        return service

    service = asyncio.run(scenario())
    assert len(service.deleted) == DELETED_KEPT and not service.containers
