"""A VM's own evidence for tests that drive it without spinboxd (no journal to keep): its
serial console and vminitd's log port are copied into files while the test runs, and a
failed test keeps them, with where the guest then is, under the artifacts directory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from spinbox.vm import VirtualMachine, gueststate
from tests.harness.evidence import evidence_dir
from tests.harness.fixtures import artifacts_dir

# Magic SysRq keys asked for on failure: every CPU's backtrace, blocked tasks, memory.
SYSRQ_KEYS = (b"l", b"w", b"m")
ASK_TIMEOUT = 30.0
DRAIN = 1.0  # for the guest kernel's answer to reach the console


class GuestLogs:
    def __init__(self, vm: VirtualMachine, directory: Path) -> None:
        self.vm = vm
        self.directory = directory
        self._console: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    async def follow(cls, vm: VirtualMachine, directory: Path) -> GuestLogs:
        logs = cls(vm, directory)
        reader, logs._console = await asyncio.open_unix_connection(str(vm.console_socket))
        logs._tasks.append(asyncio.create_task(_copy(reader, directory / "console.log")))
        log_reader, _ = await asyncio.open_unix_connection(str(vm.log_socket))
        logs._tasks.append(asyncio.create_task(_copy(log_reader, directory / "vminitd.log")))
        return logs

    async def keep(self, name: str) -> str:
        """Asks QEMU and the guest kernel where the guest is, then copies what was followed to
        the artifacts directory; returns a sentence naming where (for the failure's report)."""
        notes = self.directory / "state.txt"
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                lines = await gueststate.describe_vcpus(self.vm)
                devices: Any = await self.vm.query("query-memory-devices")
                lines.append("QEMU's memory devices: " + json.dumps(devices))
                notes.write_text("\n".join(lines) + "\n")
                await self._sysrq()
        except Exception as error:  # the evidence must still be kept
            with notes.open("a") as out:
                out.write(f"asking where the guest is failed: {error!r}\n")
        target = evidence_dir(artifacts_dir(), name)
        await asyncio.sleep(DRAIN)
        shutil.copytree(self.directory, target, dirs_exist_ok=True)
        return f"the guest's console, vminitd's log and where the guest was are saved in {target}"

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._console is not None:
            self._console.close()

    async def _sysrq(self) -> None:
        assert self._console is not None
        loglevel = gueststate.console_loglevel(gueststate.kernel_args_of(self.vm.pid))
        back = str(max(0, min(loglevel, 9))).encode()
        keys = [
            gueststate.BREAK + b"9",
            *(gueststate.BREAK + key for key in SYSRQ_KEYS),
            gueststate.BREAK + back,
        ]
        for index, key in enumerate(keys):
            if index:
                await asyncio.sleep(gueststate.SYSRQ_PAUSE)
            self._console.write(key)
            await self._console.drain()


async def _copy(reader: asyncio.StreamReader, path: Path) -> None:
    with path.open("ab", buffering=0) as out:
        while chunk := await reader.read(65536):
            out.write(chunk)
