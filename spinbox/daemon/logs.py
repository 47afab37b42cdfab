"""A VM's three log streams into the journal, attributed to the VM's scope.

Each line becomes one entry with SPINBOX_VM=<id>, a SYSLOG_IDENTIFIER saying
where it came from (qemu, spinbox-console, vminitd), a PRIORITY and
OBJECT_SYSTEMD_UNIT=spinbox-vm-<id>.scope, which `journalctl -u <scope>`
matches for entries logged by root.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from systemd import journal

log = logging.getLogger(__name__)

MAX_LINE = 16 * 1024
_PRIORITY_PREFIX = re.compile(rb"<([0-7])>")
# QEMU writes to stderr only to warn or to fail.
QEMU_PRIORITY = 4
CONSOLE_PRIORITY = 6

Sink = Callable[[str, str, int], None]


def journal_sink(vm_id: str, scope: str) -> Sink:
    def send(identifier: str, message: str, priority: int) -> None:
        journal.send(
            message,
            PRIORITY=str(priority),
            SYSLOG_IDENTIFIER=identifier,
            SPINBOX_VM=vm_id,
            OBJECT_SYSTEMD_UNIT=scope,
        )

    return send


def _clean(raw: bytes) -> str:
    return raw.rstrip(b"\r\n").decode("utf-8", "replace").replace("\r", "")


def split_priority(raw: bytes, default: int = 6) -> tuple[int, bytes]:
    """`<N>message` → (N, message); other lines keep `default`."""
    match = _PRIORITY_PREFIX.match(raw)
    if match:
        return int(match.group(1)), raw[match.end() :]
    return default, raw


class LogForwarder:
    """Forwards QEMU's stderr FIFO, the serial console and vminitd's log port."""

    def __init__(self, sink: Sink, fifo: Path, console: Path | None, log_port: Path | None) -> None:
        self.sink = sink
        self.fifo = fifo
        self.console = console
        self.log_port = log_port
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._forward_fifo()))
        if self.console is not None:
            self._tasks.append(loop.create_task(self._forward_socket(self.console, "spinbox-console", False)))
        if self.log_port is not None:
            self._tasks.append(loop.create_task(self._forward_socket(self.log_port, "vminitd", True)))

    async def stop(self, drain: float = 0.5) -> None:
        """Stop forwarding; give streams `drain` seconds to deliver what QEMU left."""
        if drain and self._tasks:
            await asyncio.wait(self._tasks, timeout=drain)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    def _line(self, identifier: str, raw: bytes, parse_priority: bool, default: int) -> None:
        priority, body = split_priority(raw, default) if parse_priority else (default, raw)
        text = _clean(body)
        if text:
            self.sink(identifier, text, priority)

    async def _pump(
        self, reader: asyncio.StreamReader, identifier: str, parse_priority: bool, default: int
    ) -> None:
        while True:
            try:
                raw = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    self._line(identifier, e.partial, parse_priority, default)
                return
            except asyncio.LimitOverrunError as e:
                raw = await reader.readexactly(e.consumed)
            self._line(identifier, raw, parse_priority, default)

    async def _forward_socket(self, path: Path, identifier: str, parse_priority: bool) -> None:
        # QEMU's chardev serves one client at a time; after a spinboxd restart
        # the new spinboxd connects again. Until QEMU listens, retry.
        for _ in range(600):
            try:
                reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            log.warning("cannot connect to %s", path)
            return
        try:
            await self._pump(reader, identifier, parse_priority, CONSOLE_PRIORITY)
        finally:
            writer.close()

    async def _forward_fifo(self) -> None:
        loop = asyncio.get_running_loop()
        fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        pipe = os.fdopen(fd, "rb", buffering=0)
        reader = asyncio.StreamReader(limit=MAX_LINE)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            await self._pump(reader, "qemu", False, QEMU_PRIORITY)
        finally:
            transport.close()
