"""A virtio-serial port hands what the guest wrote for one host connection to the
next: after a session that gave up on a call, the next session reads past the
guest's late answer (a Ping whose nonce comes back) instead of taking it as its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from spinbox.agent import AgentClient
from spinbox.api.proto import agent_pb2 as pb
from spinbox.api.proto import ttrpc_pb2
from spinbox.ttrpc import Code, TtrpcError
from spinbox.ttrpc.frame import FrameReader, FrameType, encode_frame
from spinbox.vm import control


class Port:
    """A guest agent behind a virtio-serial port, at frame level: it answers Ping (echoing the
    nonce) and MountRootfs, never answers ConfigureNetwork in time, and writes that late
    answer where the port puts it: at the head of the next connection."""

    def __init__(self) -> None:
        self.late: list[bytes] = []
        self.methods: list[list[str]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen: list[str] = []
        self.methods.append(seen)
        for late in self.late:
            writer.write(late)
        self.late = []
        frames = FrameReader(reader)
        while (frame := await frames.read()) is not None:
            assert frame.type == FrameType.REQUEST  # type: ignore[union-attr]
            request = ttrpc_pb2.Request.FromString(frame.payload)  # type: ignore[union-attr]
            seen.append(request.method)
            if request.method == "ConfigureNetwork":
                # Answered after the host gave up: the port keeps it for the next connection.
                self.late.append(self._answer(frame.stream_id, pb.MountRootfsResponse(path="/stale")))
                continue
            if request.method == "Ping":
                reply: pb.PingResponse | pb.MountRootfsResponse = pb.PingResponse(
                    nonce=pb.PingRequest.FromString(request.payload).nonce
                )
            else:
                reply = pb.MountRootfsResponse(path="/fresh")
            writer.write(self._answer(frame.stream_id, reply))
        writer.close()

    @staticmethod
    def _answer(stream_id: int, reply: pb.PingResponse | pb.MountRootfsResponse) -> bytes:
        response = ttrpc_pb2.Response(payload=reply.SerializeToString())
        return encode_frame(stream_id, FrameType.RESPONSE, 0, response.SerializeToString())


async def _mount(agent: AgentClient) -> str:
    return await agent.mount_rootfs(pb.MountRootfsRequest(container_id="c1"))


async def _configure(agent: AgentClient) -> None:
    await agent.configure_network(pb.NetworkConfig())


def test_the_session_after_one_that_gave_up_reads_past_the_late_answer(tmp_path: Path) -> None:
    async def scenario() -> tuple[str, list[list[str]]]:
        port = Port()
        socket = tmp_path / "control.sock"
        server = await asyncio.start_unix_server(port.serve, path=str(socket))
        address = f"unix:{socket}"
        try:
            first = await control.session(address, _mount)  # a settled channel: no Ping before
            with pytest.raises(TtrpcError) as raised:
                await control.session(address, _configure, call_timeout=0.3)
            assert raised.value.code == Code.DEADLINE_EXCEEDED
            second = await control.session(address, _mount)
            third = await control.session(address, _mount)  # settled again
        finally:
            control.forget(address)
            server.close()
            await server.wait_closed()
        assert first == third == "/fresh"
        return second, port.methods

    second, methods = asyncio.run(scenario())
    assert second == "/fresh"
    assert methods == [["MountRootfs"], ["ConfigureNetwork"], ["Ping", "MountRootfs"], ["MountRootfs"]]


def test_a_re_adopted_channel_is_read_past_before_its_first_call(tmp_path: Path) -> None:
    async def scenario() -> tuple[str, list[list[str]]]:
        port = Port()
        # What an earlier process's given-up call left in the port.
        port.late.append(Port._answer(1, pb.MountRootfsResponse(path="/stale")))
        socket = tmp_path / "control.sock"
        server = await asyncio.start_unix_server(port.serve, path=str(socket))
        address = f"unix:{socket}"
        control.unsettled(address)
        try:
            path = await control.session(address, _mount)
        finally:
            control.forget(address)
            server.close()
            await server.wait_closed()
        return path, port.methods

    path, methods = asyncio.run(scenario())
    assert path == "/fresh"
    assert methods == [["Ping", "MountRootfs"]]
