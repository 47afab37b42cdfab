"""The long-lived shim: serves the Task API on the listener containerd's
`start` handed over as fd 3, until Shutdown. Its imports are what a serving
shim holds in memory for the life of its container (spinbox.shim.__main__
imports this module for the server alone)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from google.protobuf.message import Message

from spinbox.agent import AgentClient
from spinbox.busclient import SpinboxdError
from spinbox.shim.errors import ShimError, spinboxd_error
from spinbox.shim.events import EventPublisher, TtrpcEventSender
from spinbox.shim.options import ShimOptions
from spinbox.shim.protos import TASK_SERVICES
from spinbox.shim.service import TaskService
from spinbox.shim.spinboxd import Spinboxd
from spinbox.ttrpc import Code, Server, TtrpcError

log = logging.getLogger("spinbox.shim")

LISTENER_FD = 3


def redirect_logs_to_containerd(bundle: str, debug: bool) -> None:
    """containerd reads the `log` FIFO in the bundle and puts its lines in its
    own log; without it (or without a reader) logs go nowhere."""
    try:
        fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.ENXIO):
            raise
    else:
        os.set_blocking(fd, True)
        os.dup2(fd, 2)
        os.close(fd)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="spinbox-shim %(levelname)s %(name)s: %(message)s",
    )


def ttrpc_handler(handler: Callable[[Any], Awaitable[Message]]) -> Callable[[Any, Any], Awaitable[Message]]:
    """Turns the service's named errors into ttrpc statuses."""

    async def handle(request: Any, ctx: Any) -> Message:
        try:
            return await handler(request)
        except ShimError as error:
            raise TtrpcError(Code[error.code], error.message) from None
        except SpinboxdError as error:
            mapped = spinboxd_error(error, "spinboxd")
            raise TtrpcError(Code[mapped.code], mapped.message) from None

    return handle


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM and SIGINT, caught from before the event loop runs until close().

    As loop.add_signal_handler does it, each signal's C-level handler writes its number
    to a socket the loop reads, so none is missed; without its check that the callback
    is no coroutine function, which loads inspect (spinbox.shim.__main__ puts that off).
    Set before asyncio.run, SIGINT's handler is also one asyncio leaves alone.
    """

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.previous_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        self.previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        for signum in STOP_SIGNALS:
            signal.signal(signum, _caught)

    @contextlib.contextmanager
    def watch(self, done: asyncio.Event) -> Iterator[None]:
        """`done` is set by the first stop signal (one caught before this included)."""
        loop = asyncio.get_running_loop()

        def on_wakeup() -> None:
            with contextlib.suppress(BlockingIOError):
                if set(self.reader.recv(256)) & set(STOP_SIGNALS):
                    done.set()

        loop.add_reader(self.reader.fileno(), on_wakeup)
        try:
            yield
        finally:
            loop.remove_reader(self.reader.fileno())

    def close(self) -> None:
        for signum, handler in self.previous.items():
            if handler is not None:  # None: a handler not set from Python, which stays
                signal.signal(signum, handler)
        signal.set_wakeup_fd(self.previous_fd)
        self.reader.close()
        self.writer.close()


def _caught(signum: int, frame: object) -> None:
    """The Python-level handler of a stop signal: StopSignals' socket carries it."""


async def _serve(options: ShimOptions, listener: socket.socket, signals: StopSignals) -> None:
    done = asyncio.Event()
    with signals.watch(done):
        await _serve_until(options, listener, done)


async def _serve_until(options: ShimOptions, listener: socket.socket, done: asyncio.Event) -> None:
    sender = TtrpcEventSender(options.ttrpc_address, options.namespace)
    publisher = EventPublisher(options.namespace, sender)
    service = TaskService(
        options.namespace,
        publisher,
        connect_spinboxd=Spinboxd.connect,
        connect_agent=AgentClient.connect,
        on_shutdown=done.set,
    )
    server = Server()
    for service_name in TASK_SERVICES:
        for method, (request_type, handler) in service.methods().items():
            server.add_unary(service_name, method, request_type, ttrpc_handler(handler))
    await server.serve_socket(listener)
    log.info("serving task %s in namespace %s", options.id, options.namespace)
    await done.wait()
    # The reply to Shutdown goes out before the socket closes.
    await asyncio.sleep(0)
    try:
        async with asyncio.timeout(10):
            await publisher.close()
    except Exception as error:
        log.warning(
            "events not yet sent to containerd when the shim ended are lost: %s", error or "timed out"
        )
    await sender.close()
    await server.close()


def serve(options: ShimOptions) -> int:
    bundle = options.bundle or os.getcwd()
    redirect_logs_to_containerd(bundle, options.debug)
    try:
        listener = socket.socket(fileno=LISTENER_FD)
    except OSError as error:
        log.error("no listening socket on fd %d: run me through `start`: %s", LISTENER_FD, error)
        return 1
    signals = StopSignals()
    try:
        asyncio.run(_serve(options, listener, signals))
    finally:
        signals.close()
        if options.socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(options.socket)
    return 0
