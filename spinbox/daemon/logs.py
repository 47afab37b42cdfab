"""A VM's three log streams into the journal, attributed to the VM's scope.

Each line becomes one entry with SPINBOX_VM=<id>, a SYSLOG_IDENTIFIER saying
where it came from (qemu, spinbox-console, vminitd), a PRIORITY and
OBJECT_SYSTEMD_UNIT=spinbox-vm-<id>.scope, which `journalctl -u <scope>`
matches for entries logged by root.

While QEMU runs, entries are sent with QEMU's pid as their credentials
(root may name another process in SCM_CREDENTIALS): journald then files them
under the scope itself (_SYSTEMD_UNIT, _PID, _COMM of QEMU), and they do not
clutter `journalctl -u spinbox.service`. Otherwise (QEMU gone, or the kernel
refuses) they go out with spinboxd's own credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from systemd import journal

log = logging.getLogger(__name__)

MAX_LINE = 16 * 1024
_PRIORITY_PREFIX = re.compile(rb"<([0-7])>")
# QEMU writes to stderr only to warn or to fail.
QEMU_PRIORITY = 4
CONSOLE_PRIORITY = 6

JOURNAL_SOCKET = "/run/systemd/journal/socket"

Sink = Callable[[str, str, int], None]


def native_entry(fields: dict[str, str]) -> bytes:
    """Fields in journald's native protocol (a value with a newline goes length-prefixed)."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode()
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalSink:
    """Writes a VM's log lines to the journal, as QEMU's when `pid` is set."""

    def __init__(self, vm_id: str, scope: str, socket_path: str = JOURNAL_SOCKET) -> None:
        self.vm_id = vm_id
        self.scope = scope
        self.pid = 0
        self._path = socket_path
        self._socket: socket.socket | None = None

    def __call__(self, identifier: str, message: str, priority: int) -> None:
        fields = {
            "MESSAGE": message,
            "PRIORITY": str(priority),
            "SYSLOG_IDENTIFIER": identifier,
            "SPINBOX_VM": self.vm_id,
            "OBJECT_SYSTEMD_UNIT": self.scope,
        }
        if self.pid and self._send_as(self.pid, native_entry(fields)):
            return
        journal.send(**fields)

    def _send_as(self, pid: int, entry: bytes) -> bool:
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.connect(self._path)
            credentials = struct.pack("3i", pid, os.getuid(), os.getgid())
            self._socket.sendmsg([entry], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, credentials)])
        except OSError:
            # E.g. QEMU exited a moment ago (ESRCH) or no CAP_SYS_ADMIN (EPERM).
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


# Terminal escapes (firmware and bootloaders draw with them) and other
# control characters would make the journal store a line as a binary blob.
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])|[\x00-\x08\x0b-\x1f\x7f]")


def _clean(raw: bytes) -> str:
    return _ESCAPES.sub("", raw.decode("utf-8", "replace")).rstrip()


def split_priority(raw: bytes, default: int = 6) -> tuple[int, bytes]:
    """`<N>message` → (N, message); other lines keep `default`."""
    match = _PRIORITY_PREFIX.match(raw)
    if match:
        return int(match.group(1)), raw[match.end() :]
    return default, raw


class LogForwarder:
    """Forwards QEMU's stderr FIFO, the serial console and vminitd's log port."""

    def __init__(self, sink: JournalSink, fifo: Path) -> None:
        self.sink = sink
        self.fifo = fifo
        self._tasks: list[asyncio.Task[None]] = []
        self._fifo_fd = -1
        self._fifo_buffer = b""
        # The serial console's connection, also the way to the guest's magic SysRq.
        self._console: asyncio.StreamWriter | None = None

    def start_fifo(self) -> None:
        """Forward QEMU's stderr (from before QEMU runs, so its start-up errors are kept).

        The FIFO is opened read-write: it then never reports end-of-file while
        QEMU is not (yet, or any more) holding it, and a read never blocks.
        """
        self._fifo_fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        asyncio.get_running_loop().add_reader(self._fifo_fd, self._read_fifo)

    def _read_fifo(self) -> None:
        while True:
            try:
                chunk = os.read(self._fifo_fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            lines = (self._fifo_buffer + chunk).split(b"\n")
            self._fifo_buffer = lines.pop()
            if len(self._fifo_buffer) > MAX_LINE:
                lines.append(self._fifo_buffer)
                self._fifo_buffer = b""
            for raw in lines:
                self._line("qemu", raw, False, QEMU_PRIORITY)

    def _stop_fifo(self) -> None:
        if self._fifo_fd < 0:
            return
        asyncio.get_running_loop().remove_reader(self._fifo_fd)
        self._read_fifo()
        if self._fifo_buffer:
            self._line("qemu", self._fifo_buffer, False, QEMU_PRIORITY)
            self._fifo_buffer = b""
        os.close(self._fifo_fd)
        self._fifo_fd = -1

    def start_sockets(self, console: Path | None, log_port: Path | None) -> None:
        """Forward the serial console and vminitd's log port (once QEMU listens on them)."""
        loop = asyncio.get_running_loop()
        if console is not None:
            self._tasks.append(
                loop.create_task(self._forward_socket(console, "spinbox-console", False, console=True))
            )
        if log_port is not None:
            self._tasks.append(loop.create_task(self._forward_socket(log_port, "vminitd", True)))

    async def stop(self, drain: float = 0.5) -> None:
        """Stop forwarding; give streams `drain` seconds to deliver what QEMU left."""
        if drain and self._tasks:
            await asyncio.wait(self._tasks, timeout=drain)
        self._stop_fifo()
        self.sink.close()
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

    async def write_console(self, data: bytes) -> bool:
        """Writes to the guest's serial console (QEMU takes one client: this is it); False
        when it is not connected."""
        writer = self._console
        if writer is None or writer.is_closing():
            return False
        writer.write(data)
        await writer.drain()
        return True

    async def _forward_socket(
        self, path: Path, identifier: str, parse_priority: bool, console: bool = False
    ) -> None:
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
        if console:
            self._console = writer
        try:
            await self._pump(reader, identifier, parse_priority, CONSOLE_PRIORITY)
        finally:
            if console:
                self._console = None
            writer.close()
