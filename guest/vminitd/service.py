"""The agent API (spinbox.agent.v1.Agent): validates each request, then acts.

Runs the same on a host (tests, with a state directory of its own) and as PID 1
in the guest; the boot part lives in boot.py.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

import guest.vminitd
from guest.vminitd import hotplug, validate
from guest.vminitd.config import RuntimeConfig
from guest.vminitd.reaper import Reaper
from guest.vminitd.stdio import Busy
from guest.vminitd.timeline import Timeline
from spinbox.api.proto import agent_pb2 as pb
from spinbox.ttrpc import CallContext, Code, Server, TtrpcError

if TYPE_CHECKING:
    from guest.vminitd.containers import Containers, Process
    from guest.vminitd.forward import Forwarder
    from guest.vminitd.rootfs import RootfsManager

log = logging.getLogger(__name__)

SERVICE = "spinbox.agent.v1.Agent"
# Requests served before the deferred kernel modules are loaded (the others wait for them).
_WITHOUT_DEVICES = ("Ping", "Shutdown")
# A Ping's nonce, echoed back, is at most this long.
MAX_NONCE = 64

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


class AgentConfig(NamedTuple):  # see config.py: not a dataclass, for the boot's sake
    """The runtime's settings and where block devices are found and mounted."""

    runtime: RuntimeConfig
    mnt_dir: Path
    sys_block: Path = Path("/sys/block")
    dev: Path = Path("/dev")


def _translate(e: BaseException, method: str) -> TtrpcError:
    if isinstance(e, TtrpcError):
        return e
    if isinstance(e, validate.InvalidRequest):
        return TtrpcError(Code.INVALID_ARGUMENT, str(e))
    if isinstance(e, Busy):
        return TtrpcError(Code.FAILED_PRECONDITION, str(e))
    if isinstance(e, OSError):
        return TtrpcError(Code.INTERNAL, f"{method}: {e.strerror or e}")
    log.exception("%s failed unexpectedly", method)
    return TtrpcError(Code.INTERNAL, f"{method} failed: {e}")


def _wait_response(proc: Process) -> pb.WaitResponse:
    exited = Timestamp()
    if proc.exited_at:
        exited.FromNanoseconds(int(proc.exited_at * 1e9))
    return pb.WaitResponse(pid=proc.pid, exit_status=proc.status or 0, exited_at=exited)


class AgentService:
    def __init__(
        self,
        config: AgentConfig,
        reaper: Reaper,
        timeline: Timeline,
        power_off: Callable[[], None] | None = None,
        devices: Awaitable[None] | None = None,
        boot_memory: hotplug.BootMemory | None = None,
    ) -> None:
        """`devices`, when given, is done once the guest's devices are all there
        (deferred kernel modules): requests other than Ping and Shutdown wait for it.
        `boot_memory` is the guest's memory before anything was plugged (read now if not given)."""
        self.config = config
        self.boot_memory = boot_memory or hotplug.BootMemory.read()
        self.devices = devices
        self.reaper = reaper
        self.timeline = timeline
        self.power_off = power_off
        self.stopped = asyncio.Event()
        for d in (config.runtime.state_dir, config.runtime.rootfs_dir, config.mnt_dir):
            d.mkdir(parents=True, exist_ok=True)

    # The container and rootfs halves load at their first request: the agent
    # answers Ping without waiting for their modules (crun, json, overlay mounts).

    @functools.cached_property
    def containers(self) -> Containers:
        from guest.vminitd.containers import Containers

        return Containers(self.config.runtime, self.reaper)

    @functools.cached_property
    def rootfs(self) -> RootfsManager:
        from guest.vminitd.rootfs import RootfsManager

        config = self.config
        return RootfsManager(config.runtime.rootfs_dir, config.mnt_dir, config.sys_block, config.dev)

    async def _devices(self) -> None:
        if self.devices is not None:
            await self.devices
            self.devices = None

    def _loaded(self, name: str) -> bool:
        """Whether a lazily loaded half (`containers`, `rootfs`) exists yet."""
        return name in self.__dict__

    def register(self, server: Server) -> None:
        unary: list[tuple[str, type[Message], Callable[[Any], Awaitable[Message]]]] = [
            ("Ping", pb.PingRequest, self.ping),
            ("ConfigureNetwork", pb.NetworkConfig, self.configure_network),
            ("MountRootfs", pb.MountRootfsRequest, self.mount_rootfs),
            ("UnmountRootfs", pb.UnmountRootfsRequest, self.unmount_rootfs),
            ("SyncRootfs", pb.SyncRootfsRequest, self.sync_rootfs),
            ("Shutdown", pb.ShutdownRequest, self.shutdown),
            ("Refresh", pb.RefreshRequest, self.refresh),
            ("OnlineResources", pb.OnlineResourcesRequest, self.online_resources),
            ("CreateContainer", pb.CreateContainerRequest, self.create_container),
            ("Exec", pb.ExecRequest, self.exec),
            ("Start", pb.ProcessRequest, self.start),
            ("Signal", pb.SignalRequest, self.signal),
            ("Wait", pb.ProcessRequest, self.wait),
            ("ResizePty", pb.ResizePtyRequest, self.resize_pty),
            ("CloseStdin", pb.ProcessRequest, self.close_stdin),
            ("DeleteProcess", pb.ProcessRequest, self.delete_process),
            ("DeleteContainer", pb.ContainerRequest, self.delete_container),
            ("Pids", pb.ContainerRequest, self.pids),
            ("Pause", pb.ContainerRequest, self.pause),
            ("Resume", pb.ContainerRequest, self.resume),
            ("Stats", pb.ContainerRequest, self.stats),
            ("UpdateResources", pb.UpdateResourcesRequest, self.update_resources),
        ]
        for method, request_type, handler in unary:
            server.add_unary(SERVICE, method, request_type, self._unary(method, handler))
        server.add_server_stream(
            SERVICE, "ReadOutput", pb.ReadOutputRequest, self._stream("ReadOutput", self.read_output)
        )
        server.add_server_stream(SERVICE, "Events", pb.EventsRequest, self._stream("Events", self.events))
        server.add_server_stream(
            SERVICE, "ExportUpper", pb.ExportUpperRequest, self._stream("ExportUpper", self.export_upper)
        )
        server.add_client_stream(
            SERVICE, "WriteInput", pb.InputChunk, self._unary("WriteInput", self.write_input)
        )
        server.add_server_stream(SERVICE, "Forward", pb.ForwardRequest, self._stream("Forward", self.forward))
        server.add_client_stream(
            SERVICE, "ForwardInput", pb.ForwardChunk, self._unary("ForwardInput", self.forward_input)
        )

    def _unary(
        self, method: str, handler: Callable[[Any], Awaitable[Message]]
    ) -> Callable[[Any, CallContext], Awaitable[Message]]:
        @functools.wraps(handler)
        async def call(request: Any, ctx: CallContext) -> Message:
            self.timeline.stamp("first-request")
            try:
                if method not in _WITHOUT_DEVICES:
                    await self._devices()
                return await handler(request)
            except Exception as e:
                raise _translate(e, method) from None

        return call

    def _stream(
        self, method: str, handler: Callable[[Any], AsyncIterator[Message]]
    ) -> Callable[[Any, CallContext], AsyncIterator[Message]]:
        async def call(request: Any, ctx: CallContext) -> AsyncIterator[Message]:
            self.timeline.stamp("first-request")
            try:
                await self._devices()
                async for message in handler(request):
                    yield message
            except Exception as e:
                raise _translate(e, method) from None

        return call

    # VM plumbing

    async def ping(self, req: pb.PingRequest) -> pb.PingResponse:
        if len(req.nonce) > MAX_NONCE:
            raise validate.InvalidRequest(
                f"a Ping's nonce is at most {MAX_NONCE} bytes, not {len(req.nonce)}"
            )
        return pb.PingResponse(
            version=guest.vminitd.__version__, timeline=self.timeline.stamps, nonce=req.nonce
        )

    async def refresh(self, req: pb.RefreshRequest) -> Empty:
        from guest.vminitd import refresh

        refresh.apply(req.seed, req.realtime_ns)
        if req.warm:
            self.containers, self.rootfs  # noqa: B018 (loads them)
            refresh.warm()
            refresh.stop_page_reporting()
        return Empty()

    async def configure_network(self, req: pb.NetworkConfig) -> Empty:
        try:
            network: Any = importlib.import_module("guest.vminitd.network")
        except ImportError:
            raise TtrpcError(Code.UNIMPLEMENTED, "this guest cannot configure networks") from None
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, network.apply, req, network.ETC, network.NIC_WAIT
            )
        except network.NetworkConfigError as e:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"network configuration: {e}") from None
        return Empty()

    async def mount_rootfs(self, req: pb.MountRootfsRequest) -> pb.MountRootfsResponse:
        self.rootfs.check(req)
        path = await asyncio.get_running_loop().run_in_executor(None, self.rootfs.mount, req)
        return pb.MountRootfsResponse(path=str(path))

    async def unmount_rootfs(self, req: pb.UnmountRootfsRequest) -> Empty:
        validate.container_id(req.container_id)
        if req.container_id in self.containers.containers:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {req.container_id} still uses its rootfs")
        await asyncio.get_running_loop().run_in_executor(None, self.rootfs.unmount, req.container_id)
        return Empty()

    async def sync_rootfs(self, req: pb.SyncRootfsRequest) -> Empty:
        self.rootfs.get(req.container_id)
        await asyncio.get_running_loop().run_in_executor(None, self.rootfs.sync, req.container_id)
        return Empty()

    async def shutdown(self, req: pb.ShutdownRequest) -> Empty:
        log.info("shutting down%s", " (forced)" if req.force else "")
        if not req.force:
            if self._loaded("containers"):
                await self.containers.shutdown()
            if self._loaded("rootfs"):
                await asyncio.get_running_loop().run_in_executor(None, self.rootfs.unmount_all)
        os.sync()
        # Answer first; power off once the reply is on its way.
        asyncio.get_running_loop().call_later(0.2, self._stop)
        return Empty()

    def _stop(self) -> None:
        self.stopped.set()
        if self.power_off is not None:
            self.power_off()

    # Containers and processes

    async def create_container(self, req: pb.CreateContainerRequest) -> pb.CreateContainerResponse:
        container = await self.containers.create(req)
        return pb.CreateContainerResponse(pid=container.init.pid)

    async def exec(self, req: pb.ExecRequest) -> Empty:
        await self.containers.add_exec(req)
        return Empty()

    async def start(self, req: pb.ProcessRequest) -> pb.StartResponse:
        proc = await self.containers.start(req.container_id, req.exec_id)
        return pb.StartResponse(pid=proc.pid)

    async def signal(self, req: pb.SignalRequest) -> Empty:
        await self.containers.signal(req)
        return Empty()

    async def wait(self, req: pb.ProcessRequest) -> pb.WaitResponse:
        return _wait_response(await self.containers.wait(req.container_id, req.exec_id))

    async def resize_pty(self, req: pb.ResizePtyRequest) -> Empty:
        self.containers.resize(req)
        return Empty()

    async def close_stdin(self, req: pb.ProcessRequest) -> Empty:
        await self.containers.close_stdin(req.container_id, req.exec_id)
        return Empty()

    async def delete_process(self, req: pb.ProcessRequest) -> pb.WaitResponse:
        return _wait_response(await self.containers.delete_process(req.container_id, req.exec_id))

    async def delete_container(self, req: pb.ContainerRequest) -> Empty:
        await self.containers.delete_container(req.container_id)
        return Empty()

    async def pids(self, req: pb.ContainerRequest) -> pb.PidsResponse:
        return pb.PidsResponse(processes=self.containers.pids(req.container_id))

    async def pause(self, req: pb.ContainerRequest) -> Empty:
        await self.containers.pause(req.container_id)
        return Empty()

    async def resume(self, req: pb.ContainerRequest) -> Empty:
        await self.containers.pause(req.container_id, resume=True)
        return Empty()

    async def stats(self, req: pb.ContainerRequest) -> pb.StatsResponse:
        return pb.StatsResponse(metrics=self.containers.stats(req.container_id))

    async def online_resources(self, req: pb.OnlineResourcesRequest) -> pb.OnlineResourcesResponse:
        online = await hotplug.online(req.vcpus)
        if req.HasField("plugged_memory_kib"):
            memory = await hotplug.settle_memory(
                self.boot_memory, req.plugged_memory_kib, req.memory_timeout_ms / 1000
            )
        else:
            memory = hotplug.memory_view(self.boot_memory)
        return pb.OnlineResourcesResponse(
            online_cpus=online,
            mem_total_kib=memory.mem_total_kib,
            boot_mem_total_kib=self.boot_memory.mem_total_kib,
            removing_memory_blocks=memory.removing_blocks,
        )

    async def update_resources(self, req: pb.UpdateResourcesRequest) -> Empty:
        await self.containers.update(req)
        return Empty()

    # Streams

    async def read_output(self, req: pb.ReadOutputRequest) -> AsyncIterator[pb.OutputChunk]:
        _, proc = self.containers.find(req.container_id, req.exec_id)
        if req.stream not in (pb.STDOUT, pb.STDERR):
            raise validate.InvalidRequest(f"output stream {req.stream} is neither STDOUT nor STDERR")
        await proc.io_ready.wait()  # an exec's stdio exists once it starts
        out = proc.stdout if req.stream == pb.STDOUT else proc.stderr
        if out is None:
            name = "stdout" if req.stream == pb.STDOUT else "stderr"
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{proc.name} has no {name} to read")
        async for data in out.chunks():
            yield pb.OutputChunk(data=data)

    @functools.cached_property
    def forwarder(self) -> Forwarder:
        from guest.vminitd.forward import Forwarder

        return Forwarder()

    def forward(self, req: pb.ForwardRequest) -> AsyncIterator[pb.ForwardChunk]:
        return self.forwarder.forward(req)

    async def forward_input(self, requests: AsyncIterator[pb.ForwardChunk]) -> Empty:
        return await self.forwarder.forward_input(requests)

    async def write_input(self, requests: AsyncIterator[pb.InputChunk]) -> Empty:
        first = await anext(requests, None)
        if first is None:
            raise validate.InvalidRequest("WriteInput needs a first message naming the process")
        _, proc = self.containers.find(first.container_id, first.exec_id)
        if proc.stdin is None:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{proc.name} has no stdin to write")
        chunk: pb.InputChunk | None = first
        while chunk is not None:
            if chunk.data:
                try:
                    await proc.stdin.write(chunk.data)
                except BrokenPipeError:
                    raise TtrpcError(
                        Code.FAILED_PRECONDITION, f"the stdin of {proc.name} is closed"
                    ) from None
            if chunk.close_stdin:
                await proc.stdin.close()
            chunk = await anext(requests, None)
        return Empty()

    async def export_upper(self, req: pb.ExportUpperRequest) -> AsyncIterator[pb.UpperChunk]:
        from guest.vminitd import upperstream

        loop = asyncio.get_running_loop()
        if req.end_container and not req.container_id:
            raise validate.InvalidRequest("ExportUpper can end a container only by its id")
        if req.container_id:
            upper = await loop.run_in_executor(None, self.rootfs.upper_of, req.container_id)
            if req.end_container and self._loaded("containers"):
                await self.containers.end(req.container_id)
            device = None
        elif req.HasField("device"):
            device, upper = await loop.run_in_executor(
                None, self.rootfs.mount_upper_device, req.device, f"export-{req.device.serial}"
            )
        else:
            raise validate.InvalidRequest("ExportUpper needs a container id or a device")
        try:
            pieces = upperstream.pieces(upper)
            while (piece := await loop.run_in_executor(None, next, pieces, None)) is not None:
                yield pb.UpperChunk(data=piece)
        except upperstream.ExportError as e:
            raise TtrpcError(Code.FAILED_PRECONDITION, str(e)) from None
        finally:
            if device is not None:
                await loop.run_in_executor(None, self.rootfs.unmount_upper_device, device)

    async def events(self, req: pb.EventsRequest) -> AsyncIterator[pb.Event]:
        async for event in self.containers.events():
            yield event
