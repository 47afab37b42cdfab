"""A QMP command QEMU never answers fails at its deadline with a sentence naming the VM and the command."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from spinbox.vm import machine
from spinbox.vm.errors import VmError
from spinbox.vm.machine import VirtualMachine, VmState
from spinbox.vm.process import spawn_subprocess


class SilentQmp(QMPClient):  # type: ignore[misc]
    async def execute(self, command: str, arguments: Any = None) -> Any:
        await asyncio.Event().wait()


def test_a_qmp_command_never_answered_fails_at_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(machine, "QMP_TIMEOUT", 0.3)

    async def scenario() -> None:
        process = await spawn_subprocess(["sleep", "600"], ())
        state = VmState("silent", process.pid, None, "tcg", "unix:/nonexistent", "unix:/nonexistent")
        vm = VirtualMachine(tmp_path, state, process, SilentQmp("silent"))
        try:
            with pytest.raises(
                VmError, match=r"^VM silent: QEMU did not answer QMP query-status within 0\.3 s$"
            ):
                await vm.query("query-status")
        finally:
            await vm.kill()

    asyncio.run(scenario())
