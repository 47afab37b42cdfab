"""A VM that its scope's memory limit ended (the host kernel's OOM killer): containerd gets
TaskOOM for every container of the VM, each before that container's TaskExit (status 137),
as Kubernetes needs to show them OOMKilled; a VM killed otherwise gives no TaskOOM. A shim
talking to a spinboxd older than VMEndingCause asks VMEnding instead. (Stand-ins for the
guest and spinboxd; spinboxd's own side is tests/unit/daemon/test_scope_memory.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from spinbox.api.proto import agent_pb2
from spinbox.busclient import SpinboxdError
from spinbox.shim import events as topics
from spinbox.shim.protos import task
from spinbox.shim.spinboxd import Spinboxd
from tests.unit.shim.test_service import FakeAgent, FakeSpinboxd, Recorder, make_bundle, make_service

OOM = (
    137,
    "the VM's scope reached its memory limit (MemoryMax=939524096 bytes) "
    "and the kernel's OOM killer ended QEMU (SIGKILL)",
    "oom-kill",
)
KILLED = (137, "QEMU was killed by SIGKILL, not by spinbox", "signal")
POD = {"io.kubernetes.cri.sandbox-id": "sb"}


class LostAgent(FakeAgent):
    """A guest whose VM goes away: every Wait then fails, as the agent's connection does."""

    def __init__(self) -> None:
        super().__init__([])
        self.lost = asyncio.Event()

    async def wait(self, container_id: str, exec_id: str = "") -> agent_pb2.WaitResponse:
        await self.lost.wait()
        raise ConnectionResetError("the agent's connection was closed")


class EndedSpinboxd(FakeSpinboxd):
    def __init__(self, answer: tuple[int, str, str]) -> None:
        super().__init__()
        self.answer = answer
        self.asked: list[str] = []

    async def vm_ending(self, vm_id: str, wait: float) -> tuple[int, str, str]:
        self.asked.append(vm_id)
        await asyncio.sleep(0.01)  # a bus round trip: the members' watches interleave
        return self.answer


class EventLog(Recorder):
    def __init__(self, log: Path) -> None:
        super().__init__(log)
        self.events: list[tuple[str, str]] = []

    def publish(self, topic: str, event: Message) -> None:
        super().publish(topic, event)
        self.events.append((topic, getattr(event, "container_id", "")))


def lose_the_pod_vm(tmp_path: Path, answer: tuple[int, str, str]) -> tuple[EventLog, list[int]]:
    """A pod of three (the sandbox and two members) whose VM ends; the events and statuses."""
    log = tmp_path / "out.log"
    recorder = EventLog(log)
    agent = LostAgent()
    spinboxd = EndedSpinboxd(answer)
    names = ("sb", "app1", "app2")
    for name in names:
        (tmp_path / name).mkdir()

    async def scenario() -> list[int]:
        service = make_service(agent, spinboxd, recorder)
        for name in names:
            bundle = make_bundle(tmp_path / name, **POD)
            await service.create(task.CreateTaskRequest(id=name, bundle=str(bundle), stdout=f"file://{log}"))
            await service.start(task.StartRequest(id=name))
        agent.lost.set()
        waited = [await service.wait(task.WaitRequest(id=name)) for name in names]
        await asyncio.sleep(0)
        return [w.exit_status for w in waited]

    statuses = asyncio.run(scenario())
    assert spinboxd.asked == ["default-sb"] * 3
    return recorder, statuses


def test_every_member_of_a_pod_vm_its_limit_ended_gets_taskoom_before_its_exit(tmp_path: Path) -> None:
    recorder, statuses = lose_the_pod_vm(tmp_path, OOM)
    assert statuses == [137, 137, 137]
    ended = [(topic, cid) for topic, cid in recorder.events if topic in (topics.TASK_OOM, topics.TASK_EXIT)]
    for name in ("sb", "app1", "app2"):
        own = [topic for topic, cid in ended if cid == name]
        assert own == [topics.TASK_OOM, topics.TASK_EXIT], (name, recorder.events)


def test_a_vm_killed_otherwise_gives_no_taskoom(tmp_path: Path) -> None:
    recorder, statuses = lose_the_pod_vm(tmp_path, KILLED)
    assert statuses == [137, 137, 137]
    assert topics.TASK_OOM not in recorder.topics
    assert recorder.topics.count(topics.TASK_EXIT) == 3


class Client:
    """spinboxd's bus API as an older spinboxd (no VMEndingCause) or this one answers it."""

    def __init__(self, has_cause: bool) -> None:
        self.has_cause = has_cause
        self.calls: list[str] = []

    async def call(self, path: str, iface: str, member: str, *args: Any) -> Any:
        self.calls.append(member)
        if member == "VMEndingCause":
            if not self.has_cause:
                raise SpinboxdError("org.freedesktop.DBus.Error.UnknownMethod", "No such method")
            return list(OOM)
        return list(OOM[:2])


def test_the_shim_asks_vmendingcause_and_an_older_spinboxd_vmending() -> None:
    new, old = Client(has_cause=True), Client(has_cause=False)
    assert asyncio.run(Spinboxd(new).vm_ending("default-c1", 10)) == OOM  # type: ignore[arg-type]
    assert new.calls == ["VMEndingCause"]
    assert asyncio.run(Spinboxd(old).vm_ending("default-c1", 10)) == (*OOM[:2], "")  # type: ignore[arg-type]
    assert old.calls == ["VMEndingCause", "VMEnding"]
