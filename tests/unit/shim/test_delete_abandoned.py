"""Calls containerd stops waiting for (its deadline passed while spinboxd was
still stopping a VM) over the real ttrpc server: the delete still ends, the
shim still answers for the container until containerd's retry deletes it
again and shuts the shim down, and the shim exits once it holds nothing.

containerd 1.6's CRI handles a sandbox's TaskExit within 10 s: it loads the
task (State), kills it (Wait, Kill), deletes it (Delete) and, once the Delete
answered, removes the task and calls Shutdown; an error retries the whole
handler later, and a task whose State says NotFound is never deleted again (so its
shim would never be told to shut down)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spinbox.shim import events as topics
from spinbox.shim.process import Status
from spinbox.shim.protos import TASK_SERVICES, Empty, task
from spinbox.shim.server import ttrpc_handler
from spinbox.shim.service import TaskService
from spinbox.ttrpc import Client, Code, Server, TtrpcError
from tests.unit.shim.test_service import FakeAgent, FakeSpinboxd, Recorder, create_request, make_bundle

TASK = TASK_SERVICES[0]


class SlowStop(FakeSpinboxd):
    """spinboxd whose VM stop (or pod rootfs removal) ends when the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.stops = 0

    async def stop_vm(self, vm_id: str, timeout_ms: int, *, kill: bool = False, wait: float = 120) -> None:
        self.stops += 1
        await self.release.wait()
        await super().stop_vm(vm_id, timeout_ms, kill=kill, wait=wait)


class Shim:
    """The Task service behind a real ttrpc server, and a client talking to it as containerd does."""

    def __init__(self, tmp_path: Path, agent: FakeAgent, spinboxd: FakeSpinboxd) -> None:
        self.log = tmp_path / "out.log"
        self.bundle = make_bundle(tmp_path)
        self.recorder = Recorder(self.log)
        self.exited = asyncio.Event()

        async def connect_spinboxd() -> FakeSpinboxd:
            return spinboxd

        async def connect_agent(address: str) -> FakeAgent:
            return agent

        self.service = TaskService(
            "default",
            self.recorder,
            connect_spinboxd,  # type: ignore[arg-type]
            connect_agent,  # type: ignore[arg-type]
            on_shutdown=self.exited.set,
        )
        self.server = Server()
        for method, (request_type, handler) in self.service.methods().items():
            self.server.add_unary(TASK, method, request_type, ttrpc_handler(handler))
        self.socket = tmp_path / "shim.sock"

    async def call(self, method: str, request: Any, response: type[Any], within: float | None = None) -> Any:
        return await self.client.call(TASK, method, request, response, timeout=within)

    async def __aenter__(self) -> Shim:
        await self.server.serve_unix(self.socket)
        self.client = await Client.connect_unix(self.socket)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        await self.server.close()

    async def exited_container(self) -> None:
        """c1 created, started, killed and reaped, as before a pod's StopPodSandbox."""
        await self.call("Create", create_request(self.bundle, self.log), task.CreateTaskResponse)
        await self.call("Start", task.StartRequest(id="c1"), task.StartResponse)
        await self.call("Kill", task.KillRequest(id="c1", signal=9), Empty)
        waited = await self.call("Wait", task.WaitRequest(id="c1"), task.WaitResponse)
        assert waited.exit_status == 137

    async def abandoned_delete(self, server_deadline: bool = True) -> None:
        """A Delete containerd stops waiting for: the server cancels its handler at the
        call's deadline, or (`server_deadline` False) the handler runs on (a deadline
        that came later to the shim, or a cancellation the handler did not see)."""
        request = task.DeleteRequest(id="c1")
        if not server_deadline:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await self.call("Delete", request, task.DeleteResponse)
            return
        with pytest.raises(TtrpcError) as raised:
            await self.call("Delete", request, task.DeleteResponse, within=0.2)
        assert raised.value.code == Code.DEADLINE_EXCEEDED


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition did not come true within 5 s")


@pytest.fixture
def spinboxd() -> SlowStop:
    return SlowStop()


@pytest.mark.parametrize("server_deadline", [True, False], ids=["cancelled", "answered-late"])
def test_a_delete_containerd_stopped_waiting_for_ends_and_its_retry_shuts_the_shim_down(
    tmp_path: Path, spinboxd: SlowStop, server_deadline: bool
) -> None:
    async def scenario() -> None:
        async with Shim(tmp_path, FakeAgent([b"bye\n"]), spinboxd) as shim:
            await shim.exited_container()
            await shim.abandoned_delete(server_deadline)
            # containerd stopped waiting for the call, not the VM's stop.
            await asyncio.sleep(0.3)
            assert "c1" in shim.service.containers and spinboxd.stops == 1
            spinboxd.release.set()
            await until(lambda: "c1" not in shim.service.containers)
            assert not spinboxd.live and not shim.exited.is_set()
            assert shim.recorder.topics.count(topics.TASK_DELETE) == 1

            # containerd's retried TaskExit handler: the task is still there, stopped.
            state = await shim.call("State", task.StateRequest(id="c1"), task.StateResponse)
            assert (state.status, state.exit_status) == (Status.STOPPED, 137)
            waited = await shim.call("Wait", task.WaitRequest(id="c1"), task.WaitResponse)
            assert waited.exit_status == 137
            with pytest.raises(TtrpcError) as raised:
                await shim.call("Kill", task.KillRequest(id="c1", signal=9, all=True), Empty)
            assert raised.value.code == Code.NOT_FOUND
            deleted = await shim.call("Delete", task.DeleteRequest(id="c1"), task.DeleteResponse)
            assert deleted.exit_status == 137
            assert spinboxd.stops == 1 and shim.recorder.topics.count(topics.TASK_DELETE) == 1
            await shim.call("Shutdown", task.ShutdownRequest(id="c1"), Empty)
            assert shim.exited.is_set()
            # Once shut down, the container is gone for good.
            with pytest.raises(TtrpcError) as raised:
                await shim.call("State", task.StateRequest(id="c1"), task.StateResponse)
            assert raised.value.code == Code.NOT_FOUND

    asyncio.run(scenario())


def test_a_delete_asked_again_while_the_first_still_runs_joins_it(tmp_path: Path, spinboxd: SlowStop) -> None:
    async def scenario() -> None:
        async with Shim(tmp_path, FakeAgent([]), spinboxd) as shim:
            await shim.exited_container()
            await shim.abandoned_delete()
            again = asyncio.create_task(shim.call("Delete", task.DeleteRequest(id="c1"), task.DeleteResponse))
            await asyncio.sleep(0.2)
            assert not again.done()
            spinboxd.release.set()
            assert (await again).exit_status == 137
            assert spinboxd.stops == 1 and not spinboxd.live
            assert shim.recorder.topics.count(topics.TASK_DELETE) == 1
            await shim.call("Shutdown", task.ShutdownRequest(id="c1"), Empty)
            assert shim.exited.is_set()

    asyncio.run(scenario())


def test_a_shutdown_before_the_last_delete_ended_exits_once_it_has(
    tmp_path: Path, spinboxd: SlowStop
) -> None:
    async def scenario() -> None:
        async with Shim(tmp_path, FakeAgent([]), spinboxd) as shim:
            await shim.exited_container()
            await shim.abandoned_delete()
            await shim.call("Shutdown", task.ShutdownRequest(id="c1"), Empty)
            assert not shim.exited.is_set() and "default-c1" in spinboxd.live
            spinboxd.release.set()
            await until(shim.exited.is_set)
            assert not spinboxd.live and not shim.service.containers

    asyncio.run(scenario())


def test_a_shutdown_with_a_live_container_does_not_exit(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Shim(tmp_path, FakeAgent([]), FakeSpinboxd()) as shim:
            await shim.call("Create", create_request(shim.bundle, shim.log), task.CreateTaskResponse)
            await shim.call("Shutdown", task.ShutdownRequest(id="c1"), Empty)
            assert not shim.exited.is_set() and "c1" in shim.service.containers

    asyncio.run(scenario())


def test_a_failed_delete_containerd_stopped_waiting_for_is_logged_and_can_be_asked_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from spinbox.busclient import SpinboxdError

    class StopFailsLate(SlowStop):
        async def stop_vm(
            self, vm_id: str, timeout_ms: int, *, kill: bool = False, wait: float = 120
        ) -> None:
            if self.stops == 0:
                self.stops += 1
                await self.release.wait()
                raise SpinboxdError("Failed", f"VM {vm_id} was not released within 120s")
            await super().stop_vm(vm_id, timeout_ms, kill=kill, wait=wait)

    spinboxd = StopFailsLate()

    async def scenario() -> None:
        async with Shim(tmp_path, FakeAgent([]), spinboxd) as shim:
            await shim.exited_container()
            await shim.abandoned_delete()
            spinboxd.release.set()
            await until(lambda: "failed after containerd stopped waiting" in caplog.text)
            assert "c1" in shim.service.containers and "default-c1" in spinboxd.live
            await shim.call("Delete", task.DeleteRequest(id="c1"), task.DeleteResponse)
            assert not spinboxd.live and not shim.service.containers

    asyncio.run(scenario())
    assert "the delete of container 'c1' failed after containerd stopped waiting for it: " in caplog.text
    assert "cannot stop the VM of 'c1'" in caplog.text


class SlowSignalAgent(FakeAgent):
    def __init__(self) -> None:
        super().__init__([])
        self.release = asyncio.Event()

    async def signal(self, container_id: str, signal: int, exec_id: str = "", all: bool = False) -> None:
        await self.release.wait()
        await super().signal(container_id, signal, exec_id, all)


def test_a_kill_containerd_stopped_waiting_for_still_reports_the_exit(tmp_path: Path) -> None:
    agent = SlowSignalAgent()

    async def scenario() -> None:
        async with Shim(tmp_path, agent, FakeSpinboxd()) as shim:
            await shim.call("Create", create_request(shim.bundle, shim.log), task.CreateTaskResponse)
            with pytest.raises(TtrpcError) as raised:
                await shim.call("Kill", task.KillRequest(id="c1", signal=9), Empty, within=0.2)
            assert raised.value.code == Code.DEADLINE_EXCEEDED
            agent.release.set()
            # The container killed before it started exits, and containerd hears of it.
            waited = await shim.call("Wait", task.WaitRequest(id="c1"), task.WaitResponse, within=5)
            assert waited.exit_status == 137
            assert topics.TASK_EXIT in shim.recorder.topics

    asyncio.run(scenario())


class SlowCreateSpinboxd(FakeSpinboxd):
    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def create_vm(self, request: Any) -> Any:
        await self.release.wait()
        return await super().create_vm(request)


def test_a_delete_during_a_create_deletes_what_the_create_made(tmp_path: Path) -> None:
    """containerd 1.6 deletes a task whose Create it gave up on, then shuts the shim down:
    a create that ends after that must not leave its VM running."""
    spinboxd = SlowCreateSpinboxd()

    async def scenario() -> None:
        async with Shim(tmp_path, FakeAgent([]), spinboxd) as shim:
            creating = asyncio.create_task(
                shim.service.create(create_request(shim.bundle, shim.log))  # a Create past its caller
            )
            await asyncio.sleep(0.1)
            deleting = asyncio.create_task(
                shim.call("Delete", task.DeleteRequest(id="c1"), task.DeleteResponse, within=5)
            )
            await asyncio.sleep(0.1)
            assert not deleting.done()
            spinboxd.release.set()
            await creating
            assert (await deleting).exit_status == 137
            assert not spinboxd.live and not shim.service.containers
            await shim.call("Shutdown", task.ShutdownRequest(id="c1"), Empty)
            assert shim.exited.is_set()

    asyncio.run(scenario())


class SlowRootfsRemoval(FakeSpinboxd):
    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def remove_rootfs(self, path: str, container_id: str) -> None:
        await self.release.wait()
        await super().remove_rootfs(path, container_id)


def test_a_pod_members_delete_containerd_stopped_waiting_for_ends_and_the_pod_goes_on(tmp_path: Path) -> None:
    spinboxd = SlowRootfsRemoval()
    for name in ("sb", "app"):
        (tmp_path / name).mkdir()
    sandbox_bundle = make_bundle(tmp_path / "sb", **{"io.kubernetes.cri.sandbox-id": "sb"})
    app_bundle = make_bundle(tmp_path / "app", **{"io.kubernetes.cri.sandbox-id": "sb"})

    async def scenario() -> None:
        async with Shim(tmp_path, FakeAgent([]), spinboxd) as shim:
            await shim.call(
                "Create", task.CreateTaskRequest(id="sb", bundle=str(sandbox_bundle)), task.CreateTaskResponse
            )
            await shim.call(
                "Create", task.CreateTaskRequest(id="app", bundle=str(app_bundle)), task.CreateTaskResponse
            )
            with pytest.raises(TtrpcError) as raised:
                await shim.call("Delete", task.DeleteRequest(id="app"), task.DeleteResponse, within=0.2)
            assert raised.value.code == Code.DEADLINE_EXCEEDED
            spinboxd.release.set()
            await until(lambda: "app" not in shim.service.containers)
            vm = "/org/spinstack/Spinbox/vm/default-sb"
            assert spinboxd.calls.count(f"RemoveRootfs {vm} app") == 1
            # containerd's retry for the member, then its Shutdown: the pod's shim stays.
            state = await shim.call("State", task.StateRequest(id="app"), task.StateResponse)
            assert state.status == Status.STOPPED
            await shim.call("Delete", task.DeleteRequest(id="app"), task.DeleteResponse)
            await shim.call("Shutdown", task.ShutdownRequest(id="app"), Empty)
            assert not shim.exited.is_set() and spinboxd.live == {"default-sb"}
            assert spinboxd.calls.count(f"RemoveRootfs {vm} app") == 1
            await shim.call("Delete", task.DeleteRequest(id="sb"), task.DeleteResponse)
            await shim.call("Shutdown", task.ShutdownRequest(id="sb"), Empty)
            assert shim.exited.is_set() and not spinboxd.live

    asyncio.run(scenario())
