"""The stdio of a process crun starts: pipes, or a pty whose master crun
sends over a console socket; the child's ends and the ends vminitd keeps."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path
from typing import Any, Protocol

from guest.vminitd.stdio import InputPipe, OutputPipe
from spinbox.api.proto import agent_pb2 as pb


class HasStdio(Protocol):
    """A process that takes the ends vminitd keeps."""

    stdin: InputPipe | None
    stdout: OutputPipe | None
    stderr: OutputPipe | None
    pty: int | None


class Stdio:
    """The fds a new process gets, and the host-side ends vminitd keeps."""

    def __init__(self, io: pb.IoConfig, console_path: Path) -> None:
        self.io = io
        self.child: list[int | None] = [None, None, None]
        self.ours: list[int] = []
        self.stdin: InputPipe | None = None
        self.stdout: OutputPipe | None = None
        self.stderr: OutputPipe | None = None
        self.console: socket.socket | None = None
        self.console_path = console_path
        if io.terminal:
            with contextlib.suppress(FileNotFoundError):
                self.console_path.unlink()
            self.console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.console.bind(str(self.console_path))
            self.console.listen(1)
            self.console.setblocking(False)
            return
        if io.stdin:
            r, w = os.pipe()
            self.child[0] = r
            self.stdin = InputPipe(w)
        if io.stdout:
            r, w = os.pipe()
            self.child[1] = w
            self.stdout = OutputPipe(r)
        if io.stderr:
            r, w = os.pipe()
            self.child[2] = w
            self.stderr = OutputPipe(r)

    async def receive_pty(self, done: asyncio.Future[Any]) -> int | None:
        """The pty master crun sends over the console socket, or None if crun ended first."""
        assert self.console is not None
        loop = asyncio.get_running_loop()
        accept: asyncio.Future[Any] = asyncio.ensure_future(loop.sock_accept(self.console))
        await asyncio.wait({accept, done}, return_when=asyncio.FIRST_COMPLETED)
        if not accept.done():
            await asyncio.sleep(0)  # crun may have connected just before it exited
        if not accept.done():
            accept.cancel()
            return None
        conn, _ = accept.result()
        with conn:
            conn.settimeout(10)  # crun sends the fd right after connecting
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        return fds[0] if fds else None

    def attach(self, proc: HasStdio, pty: int | None) -> None:
        proc.stdin, proc.stdout, proc.stderr = self.stdin, self.stdout, self.stderr
        if pty is not None:
            proc.pty = pty
            if self.io.stdout:
                proc.stdout = OutputPipe(os.dup(pty))
            if self.io.stdin:
                proc.stdin = InputPipe(os.dup(pty), terminal=True)

    def close_child_ends(self) -> None:
        for fd in self.child:
            if fd is not None:
                os.close(fd)
        self.child = [None, None, None]
        if self.console is not None:
            self.console.close()
            self.console = None
            with contextlib.suppress(FileNotFoundError):
                self.console_path.unlink()

    def discard(self) -> None:
        self.close_child_ends()
        for out in (self.stdout, self.stderr):
            if out is not None:
                out.close()
        if self.stdin is not None:
            os.close(self.stdin.fd)
