"""A container as the shim keeps it (its VM, its guest agent, its processes
with their stdio tasks), and what the shim uses of the guest agent, of
spinboxd and of containerd's event exchange."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf.message import Message

from spinbox.api.proto import agent_pb2
from spinbox.mounts import Volume
from spinbox.shim.hooks import HostHooks
from spinbox.shim.process import Process
from spinbox.shim.protos import mount
from spinbox.shim.spinboxd import VmInfo, VmRequest
from spinbox.shim.stdio import ProcessIO


class Agent(Protocol):
    """What the shim uses of spinbox.agent.AgentClient."""

    on_deadline: Callable[[str], None] | None

    async def close(self) -> None: ...
    async def create_container(
        self,
        container_id: str,
        spec: bytes,
        io: agent_pb2.IoConfig | None = None,
        shared: Sequence[agent_pb2.SharedMount] = (),
        apparmor_policy: bytes = b"",
    ) -> int: ...
    async def exec(
        self,
        container_id: str,
        exec_id: str,
        process: bytes,
        io: agent_pb2.IoConfig | None = None,
        apparmor_policy: bytes = b"",
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
    def forward(self, port: int) -> AsyncIterator[agent_pb2.ForwardChunk]: ...
    async def forward_input(self, chunks: AsyncIterable[agent_pb2.ForwardChunk]) -> None: ...


class VmManager(Protocol):
    """What the shim uses of spinboxd (spinbox.shim.spinboxd.Spinboxd)."""

    async def create_vm(self, request: VmRequest) -> VmInfo: ...
    async def prepare_network_namespace(self, vm_id: str) -> tuple[str, int]: ...
    async def open_port_forward(self, path: str) -> int: ...
    async def get_vm(self, vm_id: str) -> str | None: ...
    async def vm_ending(self, vm_id: str, wait: float) -> tuple[int, str, str]: ...
    async def add_rootfs(self, path: str, container_id: str, mounts: Any) -> str: ...
    async def remove_rootfs(self, path: str, container_id: str) -> None: ...
    async def vm_resources(self, path: str) -> dict[str, Any]: ...
    async def resize_vm(self, path: str, vcpus: int, memory_mib: int) -> dict[str, Any]: ...
    async def add_volumes(self, path: str, container_id: str, volumes: Sequence[Volume]) -> None: ...
    async def vm_call(self, path: str, member: str, signature: str = "", body: Any = ()) -> None: ...
    async def record_guest_state(self, path: str, reason: str) -> None: ...
    async def stop_vm(
        self, vm_id: str, timeout_ms: int, *, kill: bool = False, wait: float = 120
    ) -> None: ...


class Forwarder(Protocol):
    async def close(self) -> None: ...


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
    """A container the shim serves: its spec, its VM, its processes."""

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
    # How the VM ended (spinboxd's VMEndingCause), for processes lost with it: exit status, why,
    # and what ended it.
    vm_ending: Callable[[], Awaitable[tuple[int, str, str]]] | None = None
    # Whether TaskOOM was published for the OOM killer ending the VM (once, before any exit).
    vm_oom_published: bool = False
    # The container's delete once begun: it runs to its end even if containerd stops waiting.
    deleting: asyncio.Task[None] | None = None
    # A pod sandbox's port-forward (spinbox.shim.portforward.PortForwarder).
    forwarder: Forwarder | None = None
