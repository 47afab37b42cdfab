"""containerd's Task API (containerd.task.v2.Task and v3): each method
validates, acts (through spinboxd and the guest agent), then publishes its
event. Create's work is in spinbox.shim.create, the copying of stdio in
spinbox.shim.pump and the ordered exit path in spinbox.shim.exits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from google.protobuf.message import Message

from spinbox.busclient import SpinboxdError
from spinbox.shim import events as topics
from spinbox.shim import exits, pump, released, resize
from spinbox.shim.apparmor import AppArmorError, policy_for_process, policy_for_spec
from spinbox.shim.container import Agent, Container, ProcessState, Publisher, VmManager
from spinbox.shim.create import ContainerCreator, CreatePlan, load_spec
from spinbox.shim.cri import SANDBOX_ID_ANNOTATION
from spinbox.shim.errors import (
    already_exists,
    invalid,
    not_found,
    precondition,
    spinboxd_error,
    unimplemented,
)
from spinbox.shim.exits import now, stamp
from spinbox.shim.hooks import HookError, run_hooks, split_hooks, state_json
from spinbox.shim.podcheck import PodCheckError, check_cri_spec, check_pod_namespaces
from spinbox.shim.process import Process, Status
from spinbox.shim.protos import Any as AnyMessage
from spinbox.shim.protos import Empty, events, task, task_types
from spinbox.shim.sizing import SizingError, sizing_from_spec
from spinbox.shim.stdio import Kind, StdioConfig, StdioError
from spinbox.shim.volumes import VolumeError, volumes_of

log = logging.getLogger(__name__)

METRICS_TYPE = "io.containerd.cgroups.v2.Metrics"
STOP_TIMEOUT_MS = 10_000
# How many deleted containers a shim answers for until containerd's Shutdown names them.
# containerd 2.x sends no Shutdown for a pod's further containers (their shim goes with the
# pod), so the oldest are forgotten; a retry comes seconds after the delete it follows.
DELETED_KEPT = 32

T = TypeVar("T")


async def to_the_end(work: asyncio.Task[T], what: str) -> T:
    """`work`'s result; if the caller stops waiting (its deadline passed), `work`
    still runs to its end, and a failure nobody hears of then is logged."""
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        work.add_done_callback(functools.partial(_log_unheard_failure, what))
        raise


def _log_unheard_failure(what: str, work: asyncio.Task[Any]) -> None:
    if not work.cancelled() and work.exception() is not None:
        log.error("%s failed after containerd stopped waiting for it: %s", what, work.exception())


class TaskService:
    def __init__(
        self,
        namespace: str,
        publisher: Publisher,
        connect_spinboxd: Callable[[], Awaitable[VmManager]],
        connect_agent: Callable[[str], Awaitable[Agent]],
        on_shutdown: Callable[[], None] = lambda: None,
    ) -> None:
        self.namespace = namespace
        self.publisher = publisher
        self._connect_spinboxd = connect_spinboxd
        self._spinboxd: VmManager | None = None
        self._on_shutdown = on_shutdown
        self.containers: dict[str, Container] = {}
        # Containers whose delete ended, until containerd's Shutdown for them: a
        # containerd that stopped waiting for the delete finds their exit again.
        self.deleted: dict[str, Container] = {}
        # Creates under way, each set once its create has ended (either way).
        self._creating: dict[str, asyncio.Event] = {}
        # Work that outlives the call that began it (kept here so that it is not collected).
        self._finishing: set[asyncio.Task[Any]] = set()
        # containerd's Shutdown came while deletes were still ending: the shim goes after them.
        self._exit_when_empty = False
        self.creator = ContainerCreator(namespace, self.spinboxd, connect_agent, publisher)

    # -- lookups --------------------------------------------------------------

    async def spinboxd(self) -> VmManager:
        if self._spinboxd is None:
            try:
                self._spinboxd = await self._connect_spinboxd()
            except SpinboxdError as error:
                raise spinboxd_error(error, "cannot reach spinboxd") from None
        return self._spinboxd

    def container(self, container_id: str, *, deleted: bool = False) -> Container:
        """The container; with `deleted`, also one whose delete ended but containerd has not shut it down."""
        container = self.containers.get(container_id)
        if container is None and deleted:
            container = self.deleted.get(container_id)
        if container is None:
            raise not_found(f"no container {container_id!r} in this shim")
        return container

    def pod_members(self, pod_id: str) -> list[Container]:
        """The further containers of the pod whose sandbox is `pod_id`."""
        return [c for c in self.containers.values() if c.sandbox == pod_id]

    def state_of(self, container_id: str, exec_id: str, *, deleted: bool = False) -> ProcessState:
        container = self.container(container_id, deleted=deleted)
        if not exec_id:
            return container.init
        state = container.execs.get(exec_id)
        if state is None:
            raise not_found(f"no exec {exec_id!r} in container {container_id!r}")
        return state

    # -- Create -----------------------------------------------------------------

    async def create(self, req: task.CreateTaskRequest) -> task.CreateTaskResponse:
        if not req.id:
            raise invalid("a task needs an id")
        if req.id in self.containers or req.id in self._creating:
            raise already_exists(f"container {req.id!r} already exists in this shim")
        if req.checkpoint:
            raise unimplemented("spinbox cannot restore a task from a checkpoint")
        spec = load_spec(req.bundle)
        try:
            sizing = sizing_from_spec(spec)
            hooks, guest_spec = split_hooks(spec)
            stdio = StdioConfig.parse(req.stdin, req.stdout, req.stderr, req.terminal)
            annotations = {str(k): str(v) for k, v in (spec.get("annotations") or {}).items()}
            check_cri_spec(req.id, spec, annotations)
            volumes = volumes_of(guest_spec, req.id)
            apparmor = policy_for_spec(spec)
        except (SizingError, HookError, StdioError, PodCheckError, VolumeError, AppArmorError) as error:
            raise invalid(str(error)) from None
        plan = CreatePlan(req, spec, guest_spec, volumes, sizing, hooks, stdio, annotations, apparmor)
        sandbox = annotations.get(SANDBOX_ID_ANNOTATION, "")
        self.deleted.pop(req.id, None)
        self._exit_when_empty = False
        self._creating[req.id] = created = asyncio.Event()
        try:
            if sandbox and sandbox != req.id:
                pod = self.containers.get(sandbox)
                if pod is None or pod.sandbox:
                    raise precondition(
                        f"container {req.id!r} belongs to pod {sandbox!r}, which this shim does not run"
                    )
                try:
                    check_pod_namespaces(req.id, spec, pod.vm.pid)
                except PodCheckError as error:
                    raise invalid(str(error)) from None
                container = await self.creator.in_pod(plan, pod)
                await resize.grow_pod(await self.spinboxd(), pod, [*self.pod_members(pod.id), container])
            else:
                container = await self.creator.in_new_vm(plan)
        except BaseException:
            del self._creating[req.id]
            created.set()
            raise
        del self._creating[req.id]
        self.containers[req.id] = container
        created.set()
        self.publisher.publish(
            topics.TASK_CREATE,
            events.TaskCreate(
                container_id=req.id,
                bundle=req.bundle,
                rootfs=req.rootfs,
                io=events.TaskIO(
                    stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal
                ),
                checkpoint=req.checkpoint,
                pid=container.init.process.pid,
            ),
        )
        return task.CreateTaskResponse(pid=container.init.process.pid)

    # -- Start, Exec ----------------------------------------------------------------

    async def start(self, req: task.StartRequest) -> task.StartResponse:
        container = self.container(req.id)
        state = self.state_of(req.id, req.exec_id)
        proc = state.process
        proc.check_start()
        if req.exec_id and container.init.process.status != Status.RUNNING:
            raise precondition(f"container {req.id!r} is not running")
        await container.agent.start(req.id, req.exec_id)
        proc.started(container.vm.pid)
        if state.io is not None and state.io.config.stdin.kind == Kind.FIFO:
            pump.start_input(container.agent, state, state.io.config.stdin.path)
        if req.exec_id:
            self.publisher.publish(
                topics.TASK_EXEC_STARTED,
                events.TaskExecStarted(container_id=req.id, exec_id=req.exec_id, pid=proc.pid),
            )
        else:
            self.publisher.publish(topics.TASK_START, events.TaskStart(container_id=req.id, pid=proc.pid))
        exits.watch(container, state, self.publisher)
        if not req.exec_id:
            await run_hooks(
                "poststart",
                container.hooks.poststart,
                state_json(container.spec, req.id, "running", container.hook_pid, container.bundle),
                fatal=False,
            )
        return task.StartResponse(pid=proc.pid)

    async def exec(self, req: task.ExecProcessRequest) -> Empty:
        container = self.container(req.id)
        if not req.exec_id:
            raise invalid("an exec needs an exec id")
        if req.exec_id in container.execs:
            raise already_exists(f"exec {req.exec_id!r} already exists in container {req.id!r}")
        if container.init.process.status not in (Status.RUNNING, Status.PAUSED):
            raise precondition(f"container {req.id!r} is not running")
        try:
            stdio = StdioConfig.parse(req.stdin, req.stdout, req.stderr, req.terminal)
            apparmor = policy_for_process(req.spec.value)
        except (StdioError, AppArmorError) as error:
            raise invalid(str(error)) from None
        state = ProcessState(Process(req.id, req.exec_id, req.terminal, req.stdin, req.stdout, req.stderr))
        container.execs[req.exec_id] = state
        try:
            io_config = await pump.open_stdio(state, stdio, req.id, self.namespace)
            await container.agent.exec(req.id, req.exec_id, req.spec.value, io_config, apparmor)
            pump.start_output(container.agent, state)
        except BaseException as error:
            del container.execs[req.exec_id]
            await pump.stop(state)
            if isinstance(error, StdioError):
                raise invalid(str(error)) from None
            raise
        self.publisher.publish(
            topics.TASK_EXEC_ADDED, events.TaskExecAdded(container_id=req.id, exec_id=req.exec_id)
        )
        return Empty()

    # -- Kill, Wait, Delete ---------------------------------------------------------

    async def kill(self, req: task.KillRequest) -> Empty:
        container = self.container(req.id)
        state = self.state_of(req.id, req.exec_id)
        state.process.check_signal()
        # A signal sent is followed by the exit watch it needs, even if containerd stops waiting.
        await to_the_end(
            self._finishing_task(self._signal(container, state, req)),
            f"signal {req.signal} to {state.process.name}",
        )
        return Empty()

    async def _signal(self, container: Container, state: ProcessState, req: task.KillRequest) -> None:
        await container.agent.signal(req.id, req.signal, exec_id=req.exec_id, all=req.all)
        if state.process.status == Status.CREATED and not req.exec_id:
            # A container killed before it started still exits.
            exits.watch(container, state, self.publisher)

    def _finishing_task(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        finishing = asyncio.get_running_loop().create_task(work)
        self._finishing.add(finishing)
        finishing.add_done_callback(self._finishing.discard)
        return finishing

    async def wait(self, req: task.WaitRequest) -> task.WaitResponse:
        state = self.state_of(req.id, req.exec_id, deleted=True)
        exit = await state.process.wait()
        return task.WaitResponse(exit_status=exit.status, exited_at=stamp(exit.at))

    async def delete(self, req: task.DeleteRequest) -> task.DeleteResponse:
        creating = self._creating.get(req.id)
        if creating is not None and not req.exec_id:
            # A Delete after a Create containerd gave up on: the create's end decides what there is to delete.
            await creating.wait()
        container = self.container(req.id, deleted=True)
        state = self.state_of(req.id, req.exec_id, deleted=True)
        proc = state.process
        if req.exec_id:
            proc.check_delete()
            try:
                await container.agent.delete_process(req.id, req.exec_id)
            except Exception as error:  # its exit was reported; the guest keeps only its record
                log.warning("guest could not delete exec %s of %s: %s", req.exec_id, req.id, error)
            await pump.stop(state)
            container.execs.pop(req.exec_id, None)
            return self._delete_response(proc)
        if req.id in self.containers:
            proc.check_delete()
            if container.deleting is None:
                container.deleting = self._finishing_task(self._delete_container(container))
            # The VM's stop and the shim's records of the container end together, whether or
            # not containerd still waits; a Delete asked again joins the one under way.
            await to_the_end(container.deleting, f"the delete of container {req.id!r}")
        # A Delete asked again after one containerd stopped waiting for: the same answer.
        return self._delete_response(proc)

    def _delete_response(self, proc: Process) -> task.DeleteResponse:
        exit = proc.exit
        return task.DeleteResponse(
            pid=proc.pid,
            exit_status=exit.status if exit else 0,
            exited_at=stamp(exit.at if exit else None),
        )

    async def _delete_container(self, container: Container) -> None:
        """Removes the container, its VM (whose stop writes the rootfs back), runs poststop hooks and
        publishes TaskDelete; on failure the container stays for a next Delete."""
        try:
            await self._remove_container(container)
        except BaseException:
            container.deleting = None
            raise
        # A container deleted before it ever ran was killed with its VM; waiters learn so.
        container.init.process.exited(exits.KILLED, now())
        await run_hooks(
            "poststop",
            container.hooks.poststop,
            state_json(container.spec, container.id, "stopped", 0, container.bundle),
            fatal=False,
        )
        del self.containers[container.id]
        self.deleted[container.id] = container
        while len(self.deleted) > DELETED_KEPT:
            del self.deleted[next(iter(self.deleted))]
        response = self._delete_response(container.init.process)
        self.publisher.publish(
            topics.TASK_DELETE,
            events.TaskDelete(
                container_id=container.id,
                pid=response.pid,
                exit_status=response.exit_status,
                exited_at=response.exited_at,
                id=container.id,
            ),
        )
        if self._exit_when_empty and not self.containers and not self._creating:
            self._on_shutdown()

    async def _remove_container(self, container: Container) -> None:
        for state in [*container.execs.values(), container.init]:
            if state.watcher is not None and not state.watcher.done():
                state.watcher.cancel()
            await pump.stop(state)
        if container.sandbox:
            # The pod's VM stays for its other containers. A VM of its own goes with everything in
            # it: the guest's Shutdown ends the container, after its writable layer is written back.
            try:
                await container.agent.delete_container(container.id)
            except Exception as error:
                log.warning("guest could not delete %s: %s", container.id, error)
        if container.oom_watcher is not None:
            container.oom_watcher.cancel()
        try:
            if container.sandbox:
                # Only this rootfs goes (unless the sandbox went first, and its VM with everything in it).
                if container.sandbox in self.containers:
                    await (await self.spinboxd()).remove_rootfs(container.vm.path, container.id)
            else:
                if container.forwarder is not None:
                    await container.forwarder.close()
                    container.forwarder = None
                with contextlib.suppress(Exception):
                    await container.agent.close()
                await (await self.spinboxd()).stop_vm(container.vm_id, STOP_TIMEOUT_MS)
        except SpinboxdError as error:
            # The container stays, so that containerd's next Delete tries again (unless it is gone).
            if error.kind == "NotFound":
                pass
            elif container.sandbox:
                raise spinboxd_error(error, f"cannot remove the rootfs of {container.id!r}") from None
            else:
                raise spinboxd_error(error, f"cannot stop the VM of {container.id!r}") from None
        try:
            released.mark(container.bundle)
        except OSError as error:
            # containerd's `delete` then asks spinboxd again: slower, nothing lost.
            log.warning("could not record in the bundle of %s that its VM is gone: %s", container.id, error)

    # -- State, Pids, Stats ---------------------------------------------------------

    async def state(self, req: task.StateRequest) -> task.StateResponse:
        container = self.container(req.id, deleted=True)
        proc = self.state_of(req.id, req.exec_id, deleted=True).process
        exit = proc.exit
        return task.StateResponse(
            id=proc.exec_id or proc.container_id,
            bundle=container.bundle,
            pid=proc.pid,
            status=int(proc.status),  # type: ignore[arg-type]
            stdin=proc.stdin,
            stdout=proc.stdout,
            stderr=proc.stderr,
            terminal=proc.terminal,
            exit_status=exit.status if exit else 0,
            exited_at=stamp(exit.at if exit else None),
            exec_id=proc.exec_id,
        )

    async def pids(self, req: task.PidsRequest) -> task.PidsResponse:
        container = self.container(req.id)
        processes = await container.agent.pids(req.id)
        return task.PidsResponse(processes=[task_types.ProcessInfo(pid=p.pid) for p in processes])

    async def stats(self, req: task.StatsRequest) -> task.StatsResponse:
        container = self.container(req.id)
        metrics = await container.agent.stats(req.id)
        return task.StatsResponse(stats=AnyMessage(type_url=METRICS_TYPE, value=metrics))

    # -- Pause, Resume, Update, I/O -------------------------------------------------

    async def pause(self, req: task.PauseRequest) -> Empty:
        container = self.container(req.id)
        container.init.process.check_pause()
        await container.agent.pause(req.id)
        container.init.process.paused()
        try:
            # What the container wrote so far becomes visible to `commit`.
            await (await self.spinboxd()).vm_call(container.vm.path, "SyncRootfs")
        except SpinboxdError as error:
            log.warning("could not sync the rootfs of paused %s: %s", req.id, error.message)
        self.publisher.publish(topics.TASK_PAUSED, events.TaskPaused(container_id=req.id))
        return Empty()

    async def resume(self, req: task.ResumeRequest) -> Empty:
        container = self.container(req.id)
        container.init.process.check_resume()
        await container.agent.resume(req.id)
        container.init.process.resumed()
        self.publisher.publish(topics.TASK_RESUMED, events.TaskResumed(container_id=req.id))
        return Empty()

    async def update(self, req: task.UpdateTaskRequest) -> Empty:
        container = self.container(req.id)
        if not req.resources.value:
            raise invalid("Update needs resources (OCI LinuxResources)")
        members = self.pod_members(container.sandbox or container.id)
        await resize.update(await self.spinboxd(), container, members, req.resources.value)
        return Empty()

    async def resize_pty(self, req: task.ResizePtyRequest) -> Empty:
        container = self.container(req.id)
        proc = self.state_of(req.id, req.exec_id).process
        if not proc.terminal:
            raise precondition(f"{proc.name} has no terminal to resize")
        if req.width == 0 or req.height == 0:
            # Clients pass on the size of whatever terminal they have, which may be
            # none (0x0); like runc, leave the guest's terminal as it is.
            return Empty()
        await container.agent.resize_pty(req.id, req.width, req.height, exec_id=req.exec_id)
        return Empty()

    async def close_io(self, req: task.CloseIORequest) -> Empty:
        container = self.container(req.id)
        state = self.state_of(req.id, req.exec_id)
        if req.stdin and (state.stdin is None or state.stdin.done()):
            # With a stdin FIFO, its end of file closes the process's stdin
            # once everything written before it has been forwarded.
            try:
                await container.agent.close_stdin(req.id, req.exec_id)
            except Exception as error:
                log.warning("%s: its stdin could not be closed in the guest: %s", state.process.name, error)
        return Empty()

    # -- the rest -------------------------------------------------------------------

    async def checkpoint(self, req: task.CheckpointTaskRequest) -> Empty:
        raise unimplemented("spinbox cannot checkpoint a task: its processes live in a VM")

    async def connect(self, req: task.ConnectRequest) -> task.ConnectResponse:
        container = self.containers.get(req.id)
        pid = container.init.process.pid if container else 0
        return task.ConnectResponse(shim_pid=os.getpid(), task_pid=pid)

    async def shutdown(self, req: task.ShutdownRequest) -> Empty:
        self.deleted.pop(req.id, None)
        if self._creating or any(c.deleting is None for c in self.containers.values()):
            return Empty()
        if self.containers:
            # Only deletes that containerd stopped waiting for are left: the shim goes once they end.
            self._exit_when_empty = True
            return Empty()
        self._on_shutdown()
        return Empty()

    # -- the method table ---------------------------------------------------------

    def methods(self) -> dict[str, tuple[type[Message], Callable[[Any], Awaitable[Message]]]]:
        return {
            "State": (task.StateRequest, self.state),
            "Create": (task.CreateTaskRequest, self.create),
            "Start": (task.StartRequest, self.start),
            "Delete": (task.DeleteRequest, self.delete),
            "Pids": (task.PidsRequest, self.pids),
            "Pause": (task.PauseRequest, self.pause),
            "Resume": (task.ResumeRequest, self.resume),
            "Checkpoint": (task.CheckpointTaskRequest, self.checkpoint),
            "Kill": (task.KillRequest, self.kill),
            "Exec": (task.ExecProcessRequest, self.exec),
            "ResizePty": (task.ResizePtyRequest, self.resize_pty),
            "CloseIO": (task.CloseIORequest, self.close_io),
            "Update": (task.UpdateTaskRequest, self.update),
            "Wait": (task.WaitRequest, self.wait),
            "Stats": (task.StatsRequest, self.stats),
            "Connect": (task.ConnectRequest, self.connect),
            "Shutdown": (task.ShutdownRequest, self.shutdown),
        }
