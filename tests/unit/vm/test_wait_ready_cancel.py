"""wait_ready: a cancelled one (a CreateVM given up) ends its Ping cleanly, and one for a
VM whose agent answered asks nothing."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from spinbox.vm.machine import VirtualMachine, VmState
from spinbox.vm.process import spawn_subprocess


async def _vm_with_control(
    tmp_path: Path, name: str, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> tuple[VirtualMachine, asyncio.Server]:
    """A VM (a `sleep` for its QEMU) whose control channel is a socket served by `serve`."""
    control = tmp_path / "control.sock"
    server = await asyncio.start_unix_server(serve, path=str(control))
    process = await spawn_subprocess(["sleep", "600"], ())
    state = VmState(name, process.pid, None, "tcg", f"unix:{control}", f"unix:{control}")
    return VirtualMachine(tmp_path, state, process, QMPClient(name)), server


def test_cancelled_wait_ready_closes_its_ping(tmp_path: Path) -> None:
    async def scenario() -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        problems: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: problems.append(context))
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

        async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put((reader, writer))

        vm, server = await _vm_with_control(tmp_path, "cancel", never_answer)
        try:
            waiting = asyncio.ensure_future(vm.wait_ready(600))
            reader, writer = await asyncio.wait_for(accepted.get(), 60)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            # The Ping's connection was closed by the cancellation, not left waiting.
            await asyncio.wait_for(reader.read(), 60)  # the unanswered request, then the end
            assert reader.at_eof()
            writer.close()
        finally:
            await vm.kill()
            server.close()
        del waiting
        gc.collect()
        await asyncio.sleep(0)
        return problems

    assert asyncio.run(scenario()) == []


def test_a_vm_whose_agent_answered_is_ready_without_another_ping(tmp_path: Path) -> None:
    # A restored VM's agent answered Refresh: wait_ready asks nothing more of the guest.
    async def scenario() -> tuple[dict[str, float], int]:
        connections = 0

        async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            writer.close()

        vm, server = await _vm_with_control(tmp_path, "answered", count)
        try:
            vm.agent_answered()
            timeline = await asyncio.wait_for(vm.wait_ready(600), 60)
        finally:
            await vm.kill()
            server.close()
        return timeline, connections

    timeline, connections = asyncio.run(scenario())
    assert "agent-ready" in timeline
    assert connections == 0
