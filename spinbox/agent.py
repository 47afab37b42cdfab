"""The host side of the guest agent API: a typed async client for vminitd.

One method per RPC of `spinbox.agent.v1.Agent` (spinbox/api/proto/agent.proto),
over spinbox's ttrpc on a unix socket (a virtio-serial port's host end) or
vsock. Failures arrive as `spinbox.ttrpc.TtrpcError` with the agent's sentence.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError, Message

from spinbox.api.proto import agent_pb2 as pb
from spinbox.api.proto import ttrpc_pb2
from spinbox.ttrpc import Client, Code, TtrpcError

SERVICE = "spinbox.agent.v1.Agent"

# Every call but Wait (which lasts as long as the process it waits for) has a
# deadline: the agent answers in milliseconds, crun in well under a second.
# A call past its deadline fails with DEADLINE_EXCEEDED naming the method.
CALL_TIMEOUT = 60.0
# Ping's bound is the boot timeout of the wait for a new VM's agent.
NO_DEADLINE = frozenset({"Wait", "Ping"})
# Writing a container's files to disk may take a while on a slow host.
SLOW_CALLS = frozenset({"SyncRootfs", "UnmountRootfs", "Shutdown"})
SLOW_FACTOR = 5

R = TypeVar("R", bound=Message)

# Told the sentence of a call that missed its deadline (see AgentClient.on_deadline).
DeadlineHook = Callable[[str], None]


@dataclass(frozen=True)
class AgentAddress:
    """`unix:<path>` or `vsock:<cid>:<port>`, parsed."""

    kind: str
    path: str = ""
    cid: int = 0
    port: int = 0

    @classmethod
    def parse(cls, address: str) -> AgentAddress:
        scheme, sep, rest = address.partition(":")
        if sep and scheme == "unix" and rest:
            return cls(kind="unix", path=rest)
        if sep and scheme == "vsock":
            cid, _, port = rest.partition(":")
            if cid.isdigit() and port.isdigit():
                return cls(kind="vsock", cid=int(cid), port=int(port))
        raise ValueError(f"agent address {address!r} is neither unix:<path> nor vsock:<cid>:<port>")

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"vsock:{self.cid}:{self.port}"


class AgentClient:
    """A connection to one guest agent. Use `await AgentClient.connect(address)`."""

    def __init__(self, client: Client, address: str = "", call_timeout: float = CALL_TIMEOUT) -> None:
        self.client = client
        self.address = address
        self.call_timeout = call_timeout
        # Called (before the call fails) when a call misses its deadline: the shim has spinboxd
        # record where the guest is then (spinbox.shim.guestwatch).
        self.on_deadline: DeadlineHook | None = None

    @classmethod
    async def connect(cls, address: str, call_timeout: float = CALL_TIMEOUT) -> AgentClient:
        parsed = AgentAddress.parse(address)
        if parsed.kind == "unix":
            client = await Client.connect_unix(parsed.path)
        else:
            client = await Client.connect_vsock(parsed.cid, parsed.port)
        return cls(client, str(parsed), call_timeout)

    def deadline(self, method: str) -> float | None:
        """Seconds `method` may take (None: no deadline)."""
        if method in NO_DEADLINE:
            return None
        return self.call_timeout * (SLOW_FACTOR if method in SLOW_CALLS else 1)

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(
        self,
        method: str,
        request: Message,
        response_type: type[R],
        metadata: Mapping[str, str] | None = None,
    ) -> R:
        md = {k: [v] for k, v in metadata.items()} if metadata else None
        call = self.client.call(SERVICE, method, request, response_type, metadata=md)
        deadline = self.deadline(method)
        if deadline is None:
            return await call
        return await self._within(deadline, method, call)

    async def _within(self, deadline: float, method: str, call: Awaitable[R]) -> R:
        # Kept on the host, not sent as the request's timeout: the guest measures
        # a sent timeout with its own clock, and a TCG guest on a busy host was
        # seen ending a 60 s CreateContainer after 37 s of the host's time.
        try:
            async with asyncio.timeout(deadline) as scope:
                return await call
        except TimeoutError:
            if not scope.expired():
                raise
            message = f"{SERVICE}/{method}: the guest did not answer within {deadline:g} s"
            if self.on_deadline is not None:
                self.on_deadline(message)
            raise TtrpcError(Code.DEADLINE_EXCEEDED, message) from None

    # VM-level plumbing.

    async def ping(self) -> pb.PingResponse:
        return await self._call("Ping", pb.PingRequest(), pb.PingResponse)

    async def fence(self) -> None:
        """Read past whatever the guest wrote for an earlier connection to this channel.

        A virtio-serial port holds what the guest writes while no host is connected and
        hands it to the next connection: after a session that ended with a call still under
        way (given up, or refused mid-stream), the guest's late answers would otherwise be
        taken as this connection's, whose stream ids start over. A Ping carrying a fresh
        nonce is answered after everything the guest wrote before it; what comes until its
        echo is dropped. A refusal of the session (see spinbox.vm.control) is taken as is."""
        nonce = os.urandom(16)

        def ours(response: ttrpc_pb2.Response) -> bool:
            if response.status.code != Code.OK:
                return (
                    response.status.code == Code.INVALID_ARGUMENT and "stream ids" in response.status.message
                )
            try:
                return pb.PingResponse.FromString(response.payload).nonce == nonce
            except DecodeError:
                return False

        call = self.client.call(SERVICE, "Ping", pb.PingRequest(nonce=nonce), pb.PingResponse, accept=ours)
        await self._within(self.call_timeout, "Ping", call)

    async def configure_network(self, config: pb.NetworkConfig) -> None:
        await self._call("ConfigureNetwork", config, Empty)

    async def mount_rootfs(self, request: pb.MountRootfsRequest) -> str:
        """Mounts the container's rootfs in the guest; returns the guest path."""
        resp = await self._call("MountRootfs", request, pb.MountRootfsResponse)
        return resp.path

    async def unmount_rootfs(self, container_id: str) -> None:
        req = pb.UnmountRootfsRequest(container_id=container_id)
        await self._call("UnmountRootfs", req, Empty)

    async def sync_rootfs(self, container_id: str) -> None:
        await self._call("SyncRootfs", pb.SyncRootfsRequest(container_id=container_id), Empty)

    async def export_upper(
        self,
        request: pb.ExportUpperRequest,
        timeout: float,  # noqa: ASYNC109 (the stream's deadline)
    ) -> AsyncGenerator[bytes, None]:
        """The writable layer's stream (spinbox.api.upper_format), in pieces."""
        stream = self.client.server_stream(SERVICE, "ExportUpper", request, pb.UpperChunk, timeout=timeout)
        try:
            async for chunk in stream:
                yield chunk.data
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def refresh(self, seed: bytes, realtime_ns: int, warm: bool = False) -> None:
        request = pb.RefreshRequest(seed=seed, realtime_ns=realtime_ns, warm=warm)
        await self._call("Refresh", request, Empty)

    async def online_resources(
        self, vcpus: int, plugged_memory_kib: int | None = None, memory_timeout: float = 0.0
    ) -> pb.OnlineResourcesResponse:
        """Brings the guest's plugged vCPUs online; with `plugged_memory_kib` (what the VM's
        virtio-mem device has plugged) also waits up to `memory_timeout` s until the guest's
        kernel counts exactly that beyond its boot memory."""
        request = pb.OnlineResourcesRequest(vcpus=vcpus)
        if plugged_memory_kib is not None:
            request.plugged_memory_kib = plugged_memory_kib
            request.memory_timeout_ms = int(memory_timeout * 1000)
        return await self._call("OnlineResources", request, pb.OnlineResourcesResponse)

    async def shutdown(self, force: bool = False) -> None:
        await self._call("Shutdown", pb.ShutdownRequest(force=force), Empty)

    # Containers and processes.

    async def create_container(
        self,
        container_id: str,
        spec: bytes,
        io: pb.IoConfig | None = None,
        shared: Sequence[pb.SharedMount] = (),
        apparmor_policy: bytes = b"",
    ) -> int:
        """Creates the container (crun create); returns the init process's guest pid.

        `shared`: the spec's bind mounts whose sources are volumes in the VM's share;
        `apparmor_policy`: the compiled policy defining the spec's AppArmor profile."""
        req = pb.CreateContainerRequest(
            container_id=container_id,
            spec=spec,
            io=io or pb.IoConfig(),
            shared=list(shared),
            apparmor_policy=apparmor_policy,
        )
        resp = await self._call("CreateContainer", req, pb.CreateContainerResponse)
        return resp.pid

    async def exec(
        self,
        container_id: str,
        exec_id: str,
        process: bytes,
        io: pb.IoConfig | None = None,
        apparmor_policy: bytes = b"",
    ) -> None:
        """Registers an exec process (OCI process JSON); `start` runs it."""
        req = pb.ExecRequest(
            container_id=container_id,
            exec_id=exec_id,
            process=process,
            io=io or pb.IoConfig(),
            apparmor_policy=apparmor_policy,
        )
        await self._call("Exec", req, Empty)

    async def start(self, container_id: str, exec_id: str = "") -> int:
        req = pb.ProcessRequest(container_id=container_id, exec_id=exec_id)
        return (await self._call("Start", req, pb.StartResponse)).pid

    async def signal(
        self,
        container_id: str,
        signal: int,
        exec_id: str = "",
        all: bool = False,
    ) -> None:
        req = pb.SignalRequest(container_id=container_id, exec_id=exec_id, signal=signal, all=all)
        await self._call("Signal", req, Empty)

    async def wait(self, container_id: str, exec_id: str = "") -> pb.WaitResponse:
        """Waits for the process to exit; exit_status is 128+N for signal N."""
        req = pb.ProcessRequest(container_id=container_id, exec_id=exec_id)
        return await self._call("Wait", req, pb.WaitResponse)

    async def resize_pty(
        self,
        container_id: str,
        width: int,
        height: int,
        exec_id: str = "",
    ) -> None:
        req = pb.ResizePtyRequest(container_id=container_id, exec_id=exec_id, width=width, height=height)
        await self._call("ResizePty", req, Empty)

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        req = pb.ProcessRequest(container_id=container_id, exec_id=exec_id)
        await self._call("CloseStdin", req, Empty)

    async def delete_process(self, container_id: str, exec_id: str = "") -> pb.WaitResponse:
        req = pb.ProcessRequest(container_id=container_id, exec_id=exec_id)
        return await self._call("DeleteProcess", req, pb.WaitResponse)

    async def delete_container(self, container_id: str) -> None:
        req = pb.ContainerRequest(container_id=container_id)
        await self._call("DeleteContainer", req, Empty)

    async def pids(self, container_id: str) -> list[pb.ProcessInfo]:
        req = pb.ContainerRequest(container_id=container_id)
        return list((await self._call("Pids", req, pb.PidsResponse)).processes)

    async def pause(self, container_id: str) -> None:
        await self._call("Pause", pb.ContainerRequest(container_id=container_id), Empty)

    async def resume(self, container_id: str) -> None:
        await self._call("Resume", pb.ContainerRequest(container_id=container_id), Empty)

    async def stats(self, container_id: str) -> bytes:
        """The container's io.containerd.cgroups.v2.Metrics, serialized."""
        req = pb.ContainerRequest(container_id=container_id)
        return (await self._call("Stats", req, pb.StatsResponse)).metrics

    async def update_resources(self, container_id: str, resources: bytes) -> None:
        """Applies OCI LinuxResources (JSON) to a running container."""
        req = pb.UpdateResourcesRequest(container_id=container_id, resources=resources)
        await self._call("UpdateResources", req, Empty)

    # Stdio and events.

    async def read_output(
        self,
        container_id: str,
        exec_id: str = "",
        stream: pb.OutputStream = pb.STDOUT,
    ) -> AsyncIterator[bytes]:
        """The process's stdout or stderr until EOF."""
        req = pb.ReadOutputRequest(container_id=container_id, exec_id=exec_id, stream=stream)
        async for chunk in self.client.server_stream(SERVICE, "ReadOutput", req, pb.OutputChunk):
            yield chunk.data

    async def write_input(
        self,
        container_id: str,
        data: AsyncIterable[bytes],
        exec_id: str = "",
        close_stdin: bool = True,
    ) -> None:
        """Writes every chunk of `data` to the process's stdin, then closes it if asked."""

        async def chunks() -> AsyncIterator[pb.InputChunk]:
            yield pb.InputChunk(container_id=container_id, exec_id=exec_id)
            async for piece in data:
                if piece:
                    yield pb.InputChunk(data=piece)
            if close_stdin:
                yield pb.InputChunk(close_stdin=True)

        await self.client.client_stream(SERVICE, "WriteInput", chunks(), Empty)

    def forward(self, port: int) -> AsyncIterator[pb.ForwardChunk]:
        """A connection to 127.0.0.1:`port` in the VM: its first message names it, the
        rest carry its data (spinbox.api.forward). No deadline: it lasts as long as the
        connection; the caller bounds the wait for the first message."""
        return self.client.server_stream(SERVICE, "Forward", pb.ForwardRequest(port=port), pb.ForwardChunk)

    async def forward_input(self, chunks: AsyncIterable[pb.ForwardChunk]) -> None:
        """The host's side of a Forward connection; the first chunk names it."""
        await self.client.client_stream(SERVICE, "ForwardInput", chunks, Empty)

    async def events(self) -> AsyncIterator[pb.Event]:
        """Container events (OOM kills) for as long as the caller iterates."""
        async for event in self.client.server_stream(SERVICE, "Events", pb.EventsRequest(), pb.Event):
            yield event
