"""Reading a VM's serial console from its unix socket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path


async def follow_console(path: Path, sink: Callable[[bytes], None]) -> None:
    """Copy console output to sink until QEMU closes the socket."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        while chunk := await reader.read(65536):
            sink(chunk)
    finally:
        writer.close()
        await writer.wait_closed()
