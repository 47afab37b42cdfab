"""containerd's stdio URIs, and the host ends of a process's stdio.

containerd names each stream with a string:
- "" : the stream is not wanted;
- a path or `fifo://path`: a FIFO whose other end containerd (or ctr) already opened;
- `file:///path`: append the output to a file;
- `binary:///path?key=value`: a logging program (nerdctl's, for example) that
  gets stdout and stderr as fds 3 and 4 and closes (or writes to) fd 5 when
  it is ready, as containerd's runtime/v2/logging package defines.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import errno
import fcntl
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

LOGGER_READY_TIMEOUT = 60.0
CHUNK = 64 * 1024


class StdioError(ValueError):
    pass


class Kind(enum.Enum):
    NONE = "none"
    FIFO = "fifo"
    FILE = "file"
    BINARY = "binary"


@dataclass(frozen=True)
class StdioUri:
    """One stdio stream's destination as containerd names it."""

    kind: Kind
    path: str = ""
    args: tuple[str, ...] = ()  # for BINARY: the program's arguments

    @property
    def is_log(self) -> bool:
        return self.kind in (Kind.FILE, Kind.BINARY)


def parse_uri(uri: str) -> StdioUri:
    if not uri:
        return StdioUri(Kind.NONE)
    if uri.startswith("/"):
        return StdioUri(Kind.FIFO, uri)
    # Only for URIs (nerdctl's binary:// logger): containerd's own are FIFO paths.
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(uri)
    if parts.scheme == "fifo":
        path = parts.netloc + parts.path
        return StdioUri(Kind.FIFO, path)
    if parts.scheme in ("file", "binary"):
        if parts.netloc:
            raise StdioError(f"{uri!r} names a host ({parts.netloc!r}); use {parts.scheme}:///absolute/path")
        if not parts.path.startswith("/"):
            raise StdioError(f"{uri!r} needs an absolute path")
        if parts.scheme == "file":
            return StdioUri(Kind.FILE, parts.path)
        args: list[str] = []
        for key, values in parse_qs(parts.query, keep_blank_values=True).items():
            args.append(key)
            if values and values[0]:
                args.append(values[0])
        return StdioUri(Kind.BINARY, parts.path, tuple(args))
    raise StdioError(f"unsupported stdio URI {uri!r}: expected a FIFO path, file:// or binary://")


@dataclass(frozen=True)
class StdioConfig:
    """A process's three stdio streams, and whether it has a terminal."""

    stdin: StdioUri
    stdout: StdioUri
    stderr: StdioUri
    terminal: bool

    @classmethod
    def parse(cls, stdin: str, stdout: str, stderr: str, terminal: bool) -> StdioConfig:
        config = cls(parse_uri(stdin), parse_uri(stdout), parse_uri(stderr), terminal)
        if config.stdin.kind not in (Kind.NONE, Kind.FIFO):
            raise StdioError(f"stdin must be a FIFO, not {stdin!r}")
        binary = Kind.BINARY in (config.stdout.kind, config.stderr.kind)
        if binary and config.stderr.kind != Kind.NONE and config.stderr != config.stdout:
            raise StdioError("a binary:// logger must receive both stdout and stderr (same URI)")
        return config


class Sink(abc.ABC):
    """Where one output stream goes."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class _PipeProtocol(asyncio.Protocol):
    """Flow control and end of a write-only pipe transport."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        if not self.closed.done():
            self.closed.set_result(None)


class PipeSink(Sink):
    """A FIFO or pipe, written without blocking the loop. Once the reader has
    gone, further output is dropped (as runc's shim does)."""

    def __init__(self, transport: asyncio.WriteTransport, protocol: _PipeProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    @classmethod
    async def open_fd(cls, fd: int) -> PipeSink:
        pipe = os.fdopen(fd, "wb", buffering=0)
        transport, protocol = await asyncio.get_running_loop().connect_write_pipe(_PipeProtocol, pipe)
        return cls(transport, protocol)

    async def write(self, data: bytes) -> None:
        if self._transport.is_closing():
            return
        self._transport.write(data)
        await self._protocol.writable.wait()

    async def close(self) -> None:
        if not self._transport.is_closing():
            self._transport.close()
        await self._protocol.closed


class FileSink(Sink):
    """A regular file, appended to from an executor thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = asyncio.Lock()

    async def write(self, data: bytes) -> None:
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(None, _write_all, self._fd, data)

    async def close(self) -> None:
        async with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def open_fifo_for_writing(path: str) -> int:
    """The write end of containerd's FIFO. The reader is normally open already;
    if not, wait for it in a thread rather than fail."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno != errno.ENXIO:
            raise StdioError(f"cannot open the output FIFO {path}: {error.strerror}") from error
        fd = await asyncio.get_running_loop().run_in_executor(None, os.open, path, os.O_WRONLY | os.O_CLOEXEC)
    return fd


async def read_fifo(path: str) -> AsyncIterator[bytes]:
    """The data containerd writes into the stdin FIFO, until its writer closes.

    Opened non-blocking: a FIFO that never had a writer does not poll readable,
    so this waits for the writer instead of seeing an early end of file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=CHUNK, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.connect_read_pipe(lambda: protocol, os.fdopen(fd, "rb", buffering=0))
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                return
            yield data
    finally:
        transport.close()


class Child:
    """A process started with posix_spawn, awaited through a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None

    async def wait(self) -> int:
        if self.returncode is None:
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self._pidfd, _resolve, exited)
            try:
                await exited
            finally:
                loop.remove_reader(self._pidfd)
            # The pidfd is readable: the child has exited, so this does not block.
            _, status = os.waitpid(self.pid, 0)  # noqa: ASYNC222
            self.returncode = os.waitstatus_to_exitcode(status)
            os.close(self._pidfd)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def spawn_with_fds(argv: list[str], fds: list[int], env: dict[str, str]) -> Child:
    """Runs argv with `fds` as its fds 3, 4, ... and /dev/null as stdio, in its own session."""
    # Lift the sources above the targets first, so that no dup2 overwrites a later source.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for fd in fds]
    actions: list[tuple[Any, ...]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
    ]
    actions += [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(high, start=3)]
    try:
        return Child(os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True))
    finally:
        for fd in high:
            os.close(fd)


@dataclass
class LoggerProcess:
    """A binary:// logging program and the write ends of its stdout/stderr pipes."""

    child: Child
    stdout: PipeSink
    stderr: PipeSink

    async def close(self) -> None:
        await self.stdout.close()
        await self.stderr.close()
        try:
            async with asyncio.timeout(30):
                await self.child.wait()
        except TimeoutError:
            log.warning("logging program %d did not exit after its input closed; killing it", self.child.pid)
            self.child.kill()
            await self.child.wait()


async def start_logger(uri: StdioUri, container_id: str, namespace: str) -> LoggerProcess:
    """Starts the logging program with stdout on fd 3, stderr on fd 4 and the
    readiness pipe on fd 5, and waits until it says it is ready."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ready_r, ready_w = os.pipe()
    env = dict(os.environ, CONTAINER_ID=container_id, CONTAINER_NAMESPACE=namespace)
    try:
        child = spawn_with_fds([uri.path, *uri.args], [out_r, err_r, ready_w], env)
    except OSError as error:
        for fd in (out_w, err_w, ready_r):
            os.close(fd)
        raise StdioError(f"cannot start the logging program {uri.path}: {error.strerror}") from error
    finally:
        for fd in (out_r, err_r, ready_w):
            os.close(fd)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(LOGGER_READY_TIMEOUT):
            await loop.run_in_executor(None, os.read, ready_r, 1)
    except TimeoutError:
        child.kill()
        await child.wait()
        for fd in (out_w, err_w):
            os.close(fd)
        raise StdioError(f"the logging program {uri.path} did not become ready") from None
    finally:
        os.close(ready_r)
    return LoggerProcess(child, await PipeSink.open_fd(out_w), await PipeSink.open_fd(err_w))


@dataclass
class ProcessIO:
    """The host ends of one process's stdio."""

    config: StdioConfig
    stdout: Sink | None = None
    stderr: Sink | None = None
    logger: LoggerProcess | None = None
    _closers: list[Sink] = field(default_factory=list)

    @classmethod
    async def open(cls, config: StdioConfig, container_id: str, namespace: str) -> ProcessIO:
        io = cls(config)
        try:
            await io._open_outputs(container_id, namespace)
        except BaseException:
            await io.close()
            raise
        return io

    async def _open_outputs(self, container_id: str, namespace: str) -> None:
        out, err = self.config.stdout, self.config.stderr
        if out.kind == Kind.BINARY:
            self.logger = await start_logger(out, container_id, namespace)
            self.stdout = self.logger.stdout
            self.stderr = self.logger.stderr if not self.config.terminal else None
            return
        if out.kind == Kind.FILE:
            self.stdout = self._track(FileSink(_open_log_file(out.path)))
            if err == out:
                self.stderr = self.stdout
        elif out.kind == Kind.FIFO:
            self.stdout = self._track(await PipeSink.open_fd(await open_fifo_for_writing(out.path)))
        if self.config.terminal or self.stderr is not None:
            return
        if err.kind == Kind.FILE:
            self.stderr = self._track(FileSink(_open_log_file(err.path)))
        elif err.kind == Kind.FIFO:
            self.stderr = self._track(await PipeSink.open_fd(await open_fifo_for_writing(err.path)))

    def _track(self, sink: Sink) -> Sink:
        self._closers.append(sink)
        return sink

    @property
    def wants_stdin(self) -> bool:
        return self.config.stdin.kind == Kind.FIFO

    async def close(self) -> None:
        for sink in self._closers:
            with contextlib.suppress(OSError):
                await sink.close()
        self._closers.clear()
        if self.logger is not None:
            await self.logger.close()
            self.logger = None


def _open_log_file(path: str) -> int:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise StdioError(f"cannot open the log file {path}: {error.strerror}") from error
