"""containerd's Task API (containerd.task.v2.Task and v3): each method
validates, acts (through spinboxd and the guest agent), then publishes its
event. The exit path, written once in `_watch_exit`, reaps, drains the
output, records the exit and only then publishes TaskExit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from google.protobuf.message import Message

from spinbox.api.proto import agent_pb2
from spinbox.shim import events as topics
from spinbox.shim.bootstrap import SANDBOX_ID_ANNOTATION
from spinbox.shim.errors import (
    SPINBOXD_CODES,
    ShimError,
    already_exists,
    invalid,
    not_found,
    precondition,
    unimplemented,
)
from spinbox.shim.hooks import HookError, HostHooks, run_hooks, split_hooks, state_json
from spinbox.shim.process import Process, Status
from spinbox.shim.protos import Any as AnyMessage
from spinbox.shim.protos import Empty, events, mount, task, task_types
from spinbox.shim.sizing import SizingError, sizing_from_spec
from spinbox.shim.spinboxd import SpinboxdError, VmInfo, VmRequest, vm_id_for
from spinbox.shim.stdio import Kind, ProcessIO, StdioConfig, StdioError, read_fifo
from spinbox.storage import MountSpec

log = logging.getLogger(__name__)

METRICS_TYPE = "io.containerd.cgroups.v2.Metrics"
CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
# A pod's VM takes its further containers' disks on spare PCIe ports, up to
# 5 disks per container (4 read-only layer disks and the writable one).
POD_HOTPLUG_PORTS = 16
STOP_TIMEOUT_MS = 10_000


class Agent(Protocol):
    """What the service uses of spinbox.vm.agent.AgentClient."""

    async def close(self) -> None: ...
    async def create_container(
        self,
        container_id: str,
        spec: bytes,
        io: agent_pb2.IoConfig | None = None,
        files: Sequence[agent_pb2.BindFile] = (),
    ) -> int: ...
    async def exec(
        self, container_id: str, exec_id: str, process: bytes, io: agent_pb2.IoConfig | None = None
    ) -> None: ...
    async def start(self, container_id: str, exec_id: str = "") -> int: ...
    async def signal(self, container_id: str, signal: int, exec_id: str = "", all: bool = False) -> None: ...
    async def wait(self, container_id: str, exec_id: str = "") -> agent_pb2.WaitResponse: ...
    async def resize_pty(self, container_id: str, width: int, height: int, exec_id: str = "") -> None: ...
    async def close_stdin(self, container_id: str, exec_id: str = "") -> None: ...
    async def delete_process(self, container_id: str, exec_id: str = "") -> agent_pb2.WaitResponse: ...
    async def delete_container(self, container_id: str) -> None: ...
    async def pids(self, container_id: str) -> list[agent_pb2.ProcessInfo]: ...
    async def pause(self, container_id: str) -> None: ...
    async def resume(self, container_id: str) -> None: ...
    async def stats(self, container_id: str) -> bytes: ...
    async def update_resources(self, container_id: str, resources: bytes) -> None: ...
    def read_output(
        self, container_id: str, exec_id: str = "", stream: agent_pb2.OutputStream = agent_pb2.STDOUT
    ) -> AsyncIterator[bytes]: ...
    async def write_input(
        self, container_id: str, data: AsyncIterable[bytes], exec_id: str = "", close_stdin: bool = True
    ) -> None: ...
    def events(self) -> AsyncIterator[agent_pb2.Event]: ...


class VmManager(Protocol):
    """What the service uses of spinboxd (spinbox.shim.spinboxd.Spinboxd)."""

    async def create_vm(self, request: VmRequest) -> VmInfo: ...
    async def prepare_network_namespace(self, vm_id: str) -> tuple[str, int]: ...
    async def get_vm(self, vm_id: str) -> str | None: ...
    async def add_rootfs(self, path: str, container_id: str, mounts: Any) -> str: ...
    async def remove_rootfs(self, path: str, container_id: str) -> None: ...
    async def vm_call(self, path: str, member: str, signature: str = "", body: Any = ()) -> None: ...
    async def stop_vm(
        self, vm_id: str, timeout_ms: int, *, kill: bool = False, wait: float = 120
    ) -> None: ...


class Publisher(Protocol):
    def publish(self, topic: str, event: Message) -> None: ...


@dataclass
class ProcessState:
    """A process with its host-side stdio and the tasks that move its data."""

    process: Process
    io: ProcessIO | None = None
    outputs: list[asyncio.Task[None]] = field(default_factory=list)
    stdin: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None


@dataclass
class Container:
    id: str
    bundle: str
    spec: dict[str, Any]
    hooks: HostHooks
    vm_id: str
    vm: VmInfo
    agent: Agent
    init: ProcessState
    rootfs: list[mount.Mount]
    hook_pid: int
    execs: dict[str, ProcessState] = field(default_factory=dict)
    oom_watcher: asyncio.Task[None] | None = None
    # Set for a pod's further container: it shares the sandbox's VM and agent.
    sandbox: str = ""


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(at: datetime | None) -> Any:
    return topics.timestamp(at) if at is not None else topics.timestamp(datetime.fromtimestamp(0, UTC))


def _spinboxd_error(error: SpinboxdError, doing: str) -> ShimError:
    code = SPINBOXD_CODES.get(error.kind) or SPINBOXD_CODES.get(error.name) or "UNKNOWN"
    return ShimError(code, f"{doing}: {error.message}")


def _create_error(error: BaseException, doing: str) -> BaseException:
    """What a failed Create raises: spinboxd's, hooks' and stdio's errors as named shim errors."""
    if isinstance(error, SpinboxdError):
        return _spinboxd_error(error, doing)
    if isinstance(error, HookError):
        return precondition(str(error))
    if isinstance(error, StdioError):
        return invalid(str(error))
    return error


def _wants_new_netns(spec: dict[str, Any]) -> bool:
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network":
            return not ns.get("path")
    return False


def _netns_path(spec: dict[str, Any]) -> str:
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network" and ns.get("path"):
            return str(ns["path"])
    return ""


# The newest runtime-spec version the guest's crun accepts (crun 1.8 refuses
# anything but 1.0.x; the fields spinbox passes on are all in 1.0).
GUEST_OCI_VERSION = "1.0.2"


def _is_bind(mount: object) -> bool:
    if not isinstance(mount, dict):
        return False
    options = mount.get("options") or []
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


# Host files up to this size are copied into the guest for a bind mount
# (/etc/hosts, /etc/resolv.conf and the like are far smaller).
BIND_FILE_LIMIT = 1 << 20
# All of a container's bind files together, so CreateContainer stays well
# within a ttrpc message (4 MiB).
BIND_FILES_TOTAL = 2 << 20


def _read_bind_file(source: str) -> agent_pb2.BindFile | str:
    """A host file for a bind mount (content, permissions, owner), or why it cannot be copied in."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        return f"cannot open it: {error.strerror}"
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            return "directories are not shared into the VM"
        if not stat.S_ISREG(info.st_mode):
            return "it is not a regular file"
        if info.st_size > BIND_FILE_LIMIT:
            return f"it is larger than {BIND_FILE_LIMIT} bytes"
        chunks: list[bytes] = []
        size = 0
        while size <= BIND_FILE_LIMIT and (chunk := os.read(fd, BIND_FILE_LIMIT + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        return f"cannot read it: {error.strerror}"
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > BIND_FILE_LIMIT:
        return f"it is larger than {BIND_FILE_LIMIT} bytes"
    return agent_pb2.BindFile(content=data, mode=stat.S_IMODE(info.st_mode), uid=info.st_uid, gid=info.st_gid)


def for_guest(spec: dict[str, Any]) -> tuple[dict[str, Any], list[agent_pb2.BindFile]]:
    """The spec as the guest's runtime reads it, with the host files its bind mounts need.

    The runtime-spec version becomes one the guest's crun accepts. A bind mount
    of a regular host file of at most BIND_FILE_LIMIT bytes (BIND_FILES_TOTAL
    for all of them; nerdctl's and the
    CRI's /etc/hosts, /etc/resolv.conf, /etc/hostname) keeps its place and
    options; the file's content travels along and the guest binds its own
    copy. Other host bind mounts (directories, larger files) do not exist in
    the VM: they are left out with a log line rather than failing the container.
    """
    guest = dict(spec)
    if not str(spec.get("ociVersion", "")).startswith("1.0"):
        guest["ociVersion"] = GUEST_OCI_VERSION
    mounts = spec.get("mounts") or []
    if not any(_is_bind(m) for m in mounts):
        return guest, []
    kept: list[Any] = []
    files: list[agent_pb2.BindFile] = []
    total = 0
    for m in mounts:
        if not _is_bind(m):
            kept.append(m)
            continue
        file = _read_bind_file(str(m.get("source") or ""))
        if not isinstance(file, str) and total + len(file.content) > BIND_FILES_TOTAL:
            file = f"the container's bind files together would exceed {BIND_FILES_TOTAL} bytes"
        if isinstance(file, str):
            log.warning(
                "host bind mount %s of %s is not shared into the VM: %s",
                m.get("destination"),
                m.get("source"),
                file,
            )
            continue
        file.mount = len(kept)
        total += len(file.content)
        files.append(file)
        kept.append(m)
    guest["mounts"] = kept
    return guest, files


def load_spec(bundle: str) -> dict[str, Any]:
    path = Path(bundle) / "config.json"
    try:
        spec = json.loads(path.read_bytes())
    except OSError as error:
        raise invalid(f"cannot read the OCI spec {path}: {error.strerror}") from None
    except ValueError as error:
        raise invalid(f"the OCI spec {path} is not valid JSON: {error}") from None
    if not isinstance(spec, dict):
        raise invalid(f"the OCI spec {path} is not a JSON object")
    return spec


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
        self._connect_agent = connect_agent
        self._on_shutdown = on_shutdown
        self.containers: dict[str, Container] = {}
        self._creating: set[str] = set()

    # -- lookups --------------------------------------------------------------

    async def spinboxd(self) -> VmManager:
        if self._spinboxd is None:
            try:
                self._spinboxd = await self._connect_spinboxd()
            except SpinboxdError as error:
                raise _spinboxd_error(error, "cannot reach spinboxd") from None
        return self._spinboxd

    def container(self, container_id: str) -> Container:
        container = self.containers.get(container_id)
        if container is None:
            raise not_found(f"no container {container_id!r} in this shim")
        return container

    def state_of(self, container_id: str, exec_id: str) -> ProcessState:
        container = self.container(container_id)
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
        except (SizingError, HookError, StdioError) as error:
            raise invalid(str(error)) from None
        annotations = {str(k): str(v) for k, v in (spec.get("annotations") or {}).items()}
        sandbox = annotations.get(SANDBOX_ID_ANNOTATION, "")
        self._creating.add(req.id)
        try:
            if sandbox and sandbox != req.id:
                pod = self.containers.get(sandbox)
                if pod is None or pod.sandbox:
                    raise precondition(
                        f"container {req.id!r} belongs to pod {sandbox!r}, which this shim does not run"
                    )
                container = await self._add_to_pod(req, spec, guest_spec, hooks, stdio, pod)
            else:
                container = await self._create_vm_and_container(
                    req, spec, guest_spec, sizing, hooks, stdio, annotations
                )
        finally:
            self._creating.discard(req.id)
        self.containers[req.id] = container
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

    async def _create_vm_and_container(
        self,
        req: task.CreateTaskRequest,
        spec: dict[str, Any],
        guest_spec: dict[str, Any],
        sizing: Any,
        hooks: HostHooks,
        stdio: StdioConfig,
        annotations: dict[str, str],
    ) -> Container:
        spinboxd = await self.spinboxd()
        vm_id = vm_id_for(self.namespace, req.id)
        netns = _netns_path(spec)
        hook_pid = 0
        vm: VmInfo | None = None
        agent: Agent | None = None
        state = ProcessState(
            Process(req.id, "", terminal=req.terminal, stdin=req.stdin, stdout=req.stdout, stderr=req.stderr)
        )
        try:
            if hooks and _wants_new_netns(spec):
                # Hooks such as nerdctl's configure the network through
                # /proc/<pid>/ns/net before the container exists.
                netns, hook_pid = await spinboxd.prepare_network_namespace(vm_id)
            await run_hooks(
                "createRuntime",
                hooks.create_runtime,
                state_json(spec, req.id, "creating", hook_pid, req.bundle),
                fatal=True,
            )
            request = VmRequest(
                vm_id=vm_id,
                container_id=req.id,
                rootfs=tuple(MountSpec(m.type, m.source, m.target, tuple(m.options)) for m in req.rootfs),
                vcpus=sizing.vcpus,
                memory_mib=sizing.memory_mib,
                kernel_args=sizing.kernel_args,
                netns=netns,
                annotations=tuple(sorted(annotations.items())),
                hotplug_ports=POD_HOTPLUG_PORTS
                if annotations.get(CONTAINER_TYPE_ANNOTATION) == "sandbox"
                else 0,
            )
            vm = await spinboxd.create_vm(request)
            hook_pid = hook_pid or vm.pid
            agent = await self._connect_agent(vm.agent_address)
            await self._create_in_guest(agent, req, spec, guest_spec, hooks, stdio, state, vm.pid, hook_pid)
        except BaseException as error:
            await self._abandon(vm_id, vm is not None or bool(netns and hook_pid), agent, state)
            raise _create_error(error, f"cannot create the VM for {req.id!r}") from None
        container = Container(
            id=req.id,
            bundle=req.bundle,
            spec=spec,
            hooks=hooks,
            vm_id=vm_id,
            vm=vm,
            agent=agent,
            init=state,
            rootfs=list(req.rootfs),
            hook_pid=hook_pid,
        )
        container.oom_watcher = asyncio.get_running_loop().create_task(self._watch_oom(container))
        return container

    async def _create_in_guest(
        self,
        agent: Agent,
        req: task.CreateTaskRequest,
        spec: dict[str, Any],
        guest_spec: dict[str, Any],
        hooks: HostHooks,
        stdio: StdioConfig,
        state: ProcessState,
        vm_pid: int,
        hook_pid: int,
    ) -> None:
        """The container in the guest (its rootfs mounted there), its output copied, prestart hooks run."""
        state.io = await ProcessIO.open(stdio, req.id, self.namespace)
        io_config = agent_pb2.IoConfig(
            stdin=stdio.stdin.kind == Kind.FIFO,
            stdout=state.io.stdout is not None,
            stderr=state.io.stderr is not None and not req.terminal,
            terminal=req.terminal,
        )
        spec_for_guest, files = await asyncio.to_thread(for_guest, guest_spec)
        await agent.create_container(req.id, json.dumps(spec_for_guest).encode(), io_config, files)
        state.process.pid = vm_pid
        self._start_copying(agent, state)
        await run_hooks(
            "prestart", hooks.prestart, state_json(spec, req.id, "created", hook_pid, req.bundle), fatal=True
        )

    async def _add_to_pod(
        self,
        req: task.CreateTaskRequest,
        spec: dict[str, Any],
        guest_spec: dict[str, Any],
        hooks: HostHooks,
        stdio: StdioConfig,
        pod: Container,
    ) -> Container:
        """A further container of a pod: its rootfs is added to the sandbox's running VM."""
        spinboxd = await self.spinboxd()
        mounts = tuple(MountSpec(m.type, m.source, m.target, tuple(m.options)) for m in req.rootfs)
        state = ProcessState(
            Process(req.id, "", terminal=req.terminal, stdin=req.stdin, stdout=req.stdout, stderr=req.stderr)
        )
        added = False
        try:
            await run_hooks(
                "createRuntime",
                hooks.create_runtime,
                state_json(spec, req.id, "creating", pod.vm.pid, req.bundle),
                fatal=True,
            )
            await spinboxd.add_rootfs(pod.vm.path, req.id, mounts)
            added = True
            await self._create_in_guest(
                pod.agent, req, spec, guest_spec, hooks, stdio, state, pod.vm.pid, pod.vm.pid
            )
        except BaseException as error:
            await self._stop_copying(state)
            if added:
                with contextlib.suppress(Exception):
                    await pod.agent.delete_container(req.id)
                try:
                    await spinboxd.remove_rootfs(pod.vm.path, req.id)
                except Exception as undo_error:
                    log.error(
                        "could not remove the rootfs of %s after a failed create: %s", req.id, undo_error
                    )
            raise _create_error(error, f"cannot add {req.id!r} to the VM of pod {pod.id!r}") from None
        return Container(
            id=req.id,
            bundle=req.bundle,
            spec=spec,
            hooks=hooks,
            vm_id=pod.vm_id,
            vm=pod.vm,
            agent=pod.agent,
            init=state,
            rootfs=list(req.rootfs),
            hook_pid=pod.vm.pid,
            sandbox=pod.id,
        )

    async def _abandon(self, vm_id: str, has_vm: bool, agent: Agent | None, state: ProcessState) -> None:
        """Gives back what a failed Create took."""
        await self._stop_copying(state)
        if agent is not None:
            with contextlib.suppress(Exception):
                await agent.close()
        if has_vm:
            try:
                await (await self.spinboxd()).stop_vm(vm_id, 0, kill=True)
            except Exception as error:
                log.error("could not remove VM %s after a failed create: %s", vm_id, error)

    # -- stdio ------------------------------------------------------------------

    def _start_copying(self, agent: Agent, state: ProcessState) -> None:
        """Output is read from creation on (the agent holds it until a reader
        comes); stdin is forwarded once the process has started."""
        loop = asyncio.get_running_loop()
        proc, io = state.process, state.io
        assert io is not None
        streams = [(agent_pb2.STDOUT, io.stdout), (agent_pb2.STDERR, None if proc.terminal else io.stderr)]
        for stream, sink in streams:
            if sink is not None:
                state.outputs.append(loop.create_task(self._copy_output(agent, proc, stream, sink)))

    async def _copy_output(self, agent: Agent, proc: Process, stream: int, sink: Any) -> None:
        try:
            async for data in agent.read_output(proc.container_id, proc.exec_id, stream):  # type: ignore[arg-type]
                await sink.write(data)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("output of %s ended early: %s", proc.name, error)

    async def _copy_input(self, agent: Agent, proc: Process, path: str) -> None:
        try:
            await agent.write_input(
                proc.container_id, read_fifo(path), exec_id=proc.exec_id, close_stdin=True
            )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("stdin of %s ended early: %s", proc.name, error)

    async def _stop_copying(self, state: ProcessState) -> None:
        for copier in [*state.outputs, state.stdin]:
            if copier is not None and not copier.done():
                copier.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await copier
        if state.io is not None:
            await state.io.close()

    # -- exits --------------------------------------------------------------------

    def _watch(self, container: Container, state: ProcessState) -> None:
        if state.watcher is None:
            state.watcher = asyncio.get_running_loop().create_task(self._watch_exit(container, state))

    async def _watch_exit(self, container: Container, state: ProcessState) -> None:
        proc = state.process
        try:
            result = await container.agent.wait(proc.container_id, proc.exec_id)
            status = result.exit_status
            at = result.exited_at.ToDatetime(UTC) if result.HasField("exited_at") else _now()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            # The guest went away (VM killed): report the process as killed.
            log.error("lost %s: %s", proc.name, error)
            status, at = 128 + 9, _now()
        # Everything the process wrote reaches containerd before its exit does.
        if state.outputs:
            await asyncio.gather(*state.outputs, return_exceptions=True)
        if state.stdin is not None and not state.stdin.done():
            state.stdin.cancel()
        if state.io is not None:
            await state.io.close()
        proc.exited(status, at)
        self.publisher.publish(
            topics.TASK_EXIT,
            events.TaskExit(
                container_id=proc.container_id,
                id=proc.exec_id or proc.container_id,
                pid=proc.pid,
                exit_status=status,
                exited_at=_stamp(at),
            ),
        )

    async def _watch_oom(self, container: Container) -> None:
        try:
            async for event in container.agent.events():
                if event.HasField("oom"):
                    self.publisher.publish(
                        topics.TASK_OOM, events.TaskOOM(container_id=event.oom.container_id)
                    )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.debug("event stream of %s ended: %s", container.id, error)

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
            copy = self._copy_input(container.agent, proc, state.io.config.stdin.path)
            state.stdin = asyncio.get_running_loop().create_task(copy)
        if req.exec_id:
            self.publisher.publish(
                topics.TASK_EXEC_STARTED,
                events.TaskExecStarted(container_id=req.id, exec_id=req.exec_id, pid=proc.pid),
            )
        else:
            self.publisher.publish(topics.TASK_START, events.TaskStart(container_id=req.id, pid=proc.pid))
        self._watch(container, state)
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
        except StdioError as error:
            raise invalid(str(error)) from None
        state = ProcessState(Process(req.id, req.exec_id, req.terminal, req.stdin, req.stdout, req.stderr))
        container.execs[req.exec_id] = state
        try:
            state.io = await ProcessIO.open(stdio, req.id, self.namespace)
            io_config = agent_pb2.IoConfig(
                stdin=stdio.stdin.kind == Kind.FIFO,
                stdout=state.io.stdout is not None,
                stderr=state.io.stderr is not None and not req.terminal,
                terminal=req.terminal,
            )
            await container.agent.exec(req.id, req.exec_id, req.spec.value, io_config)
            self._start_copying(container.agent, state)
        except BaseException as error:
            del container.execs[req.exec_id]
            await self._stop_copying(state)
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
        await container.agent.signal(req.id, req.signal, exec_id=req.exec_id, all=req.all)
        if state.process.status == Status.CREATED and not req.exec_id:
            # A container killed before it started still exits.
            self._watch(container, state)
        return Empty()

    async def wait(self, req: task.WaitRequest) -> task.WaitResponse:
        state = self.state_of(req.id, req.exec_id)
        exit = await state.process.wait()
        return task.WaitResponse(exit_status=exit.status, exited_at=_stamp(exit.at))

    async def delete(self, req: task.DeleteRequest) -> task.DeleteResponse:
        container = self.container(req.id)
        state = self.state_of(req.id, req.exec_id)
        proc = state.process
        proc.check_delete()
        if req.exec_id:
            with contextlib.suppress(Exception):
                await container.agent.delete_process(req.id, req.exec_id)
            await self._stop_copying(state)
            del container.execs[req.exec_id]
            return self._delete_response(proc)
        await self._delete_container(container)
        # A container deleted before it ever ran was killed with its VM; waiters learn so.
        proc.exited(128 + 9, _now())
        response = self._delete_response(proc)
        self.publisher.publish(
            topics.TASK_DELETE,
            events.TaskDelete(
                container_id=req.id,
                pid=response.pid,
                exit_status=response.exit_status,
                exited_at=response.exited_at,
                id=req.id,
            ),
        )
        return response

    def _delete_response(self, proc: Process) -> task.DeleteResponse:
        exit = proc.exit
        return task.DeleteResponse(
            pid=proc.pid,
            exit_status=exit.status if exit else 0,
            exited_at=_stamp(exit.at if exit else None),
        )

    async def _delete_container(self, container: Container) -> None:
        """Removes the container, its VM (whose stop writes the rootfs back) and runs poststop hooks."""
        for state in [*container.execs.values(), container.init]:
            if state.watcher is not None and not state.watcher.done():
                state.watcher.cancel()
            await self._stop_copying(state)
        try:
            await container.agent.delete_container(container.id)
        except Exception as error:
            log.warning("guest could not delete %s: %s", container.id, error)
        if container.oom_watcher is not None:
            container.oom_watcher.cancel()
        try:
            if container.sandbox:
                # The pod's VM stays for its other containers; only this rootfs goes
                # (unless the sandbox went first, and its VM with everything in it).
                if container.sandbox in self.containers:
                    await (await self.spinboxd()).remove_rootfs(container.vm.path, container.id)
            else:
                with contextlib.suppress(Exception):
                    await container.agent.close()
                await (await self.spinboxd()).stop_vm(container.vm_id, STOP_TIMEOUT_MS)
        except SpinboxdError as error:
            if container.sandbox:
                raise _spinboxd_error(error, f"cannot remove the rootfs of {container.id!r}") from None
            raise _spinboxd_error(error, f"cannot stop the VM of {container.id!r}") from None
        finally:
            del self.containers[container.id]
        await run_hooks(
            "poststop",
            container.hooks.poststop,
            state_json(container.spec, container.id, "stopped", 0, container.bundle),
            fatal=False,
        )

    # -- State, Pids, Stats ---------------------------------------------------------

    async def state(self, req: task.StateRequest) -> task.StateResponse:
        container = self.container(req.id)
        proc = self.state_of(req.id, req.exec_id).process
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
            exited_at=_stamp(exit.at if exit else None),
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
        await container.agent.update_resources(req.id, req.resources.value)
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
            with contextlib.suppress(Exception):
                await container.agent.close_stdin(req.id, req.exec_id)
        return Empty()

    # -- the rest -------------------------------------------------------------------

    async def checkpoint(self, req: task.CheckpointTaskRequest) -> Empty:
        raise unimplemented("spinbox cannot checkpoint a task: its processes live in a VM")

    async def connect(self, req: task.ConnectRequest) -> task.ConnectResponse:
        container = self.containers.get(req.id)
        pid = container.init.process.pid if container else 0
        return task.ConnectResponse(shim_pid=os.getpid(), task_pid=pid)

    async def shutdown(self, req: task.ShutdownRequest) -> Empty:
        if self.containers or self._creating:
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
