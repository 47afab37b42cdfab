"""Log lines as the journal gets them: priorities from vminitd, clean console text."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from spinbox.daemon.logs import LogForwarder, _clean, native_entry, split_priority
from spinbox.daemon.spawn import make_fifo


def test_priority_prefix_is_split_off() -> None:
    assert split_priority(b"<3>mount failed") == (3, b"mount failed")
    assert split_priority(b"no prefix", default=6) == (6, b"no prefix")
    assert split_priority(b"<9>not a priority", default=6) == (6, b"<9>not a priority")


def test_console_escapes_are_removed() -> None:
    assert _clean(b"\x1b[2J\x1b[01;01HSeaBIOS (version 1.16)\r\n") == "SeaBIOS (version 1.16)"
    assert _clean(b"tab\there\x07") == "tab\there"
    assert _clean(b"caf\xc3\xa9 \xff") == "caf\u00e9 \ufffd"


class Collected:
    """Stands in for the journal: keeps what would be sent."""

    def __init__(self) -> None:
        self.pid = 0
        self.lines: list[tuple[str, str, int]] = []

    def __call__(self, identifier: str, message: str, priority: int) -> None:
        self.lines.append((identifier, message, priority))

    def close(self) -> None:
        pass


def test_qemu_stderr_written_while_nobody_reads_is_forwarded_later(tmp_path: Path) -> None:
    fifo = tmp_path / "qemu.log"
    make_fifo(fifo)
    # QEMU's end, as the spawned child holds it (read-write: never blocks, never EOF).
    qemu = os.open(fifo, os.O_RDWR)
    os.write(qemu, b"qemu-system-x86_64: warning: before spinboxd reads\n")

    async def forward() -> list[tuple[str, str, int]]:
        sink = Collected()
        forwarder = LogForwarder(sink, fifo)  # type: ignore[arg-type]
        forwarder.start_fifo()
        os.write(qemu, b"while it reads\nand a last line without newline")
        # Stopping reads whatever is still in the pipe.
        await forwarder.stop(drain=0)
        return sink.lines

    try:
        lines = asyncio.run(forward())
    finally:
        os.close(qemu)
    assert lines == [
        ("qemu", "qemu-system-x86_64: warning: before spinboxd reads", 4),
        ("qemu", "while it reads", 4),
        ("qemu", "and a last line without newline", 4),
    ]


def test_native_entries_frame_multi_line_values() -> None:
    assert native_entry({"MESSAGE": "one line", "PRIORITY": "6"}) == b"MESSAGE=one line\nPRIORITY=6\n"
    assert native_entry({"MESSAGE": "a\nb"}) == b"MESSAGE\n\x03\x00\x00\x00\x00\x00\x00\x00a\nb\n"
