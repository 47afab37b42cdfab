"""Port-forward into a pod's VM: the pod's localhost on the host reaches the VM's.

containerd's CRI PortForward (kubectl and crictl port-forward) enters the
pod's network namespace on the host and connects to localhost:PORT there; the
pod's traffic goes to the VM, so nothing would answer. For each pod, the shim
listens on one port of 127.0.0.1 inside that namespace, and an iptables nat
OUTPUT rule there redirects every TCP connection to 127.0.0.1 to it. The
shim reads the port each connection was for (SO_ORIGINAL_DST) and splices it
with a connection vminitd opens to 127.0.0.1:PORT in the VM, over the agent
channel the shim already holds (spinbox.api.forward): a server bound to the
pod's localhost answers as with runc, and so does one bound to 0.0.0.0.

The shim holds it because it lives exactly as long as the pod and is the
agent's client (a virtio-serial agent port has one client), and it already
carries the pod's stdio bytes: forwarded bytes never pass through spinboxd,
which a restart of spinboxd then leaves alone. The rule and the listener go
with the pod: the shim removes both when the sandbox is deleted, and the rule
lives in the pod's namespace, which containerd removes with the pod whatever
became of the shim. Only TCP is forwarded, as the CRI's PortForward is; a
connection to ::1 is not redirected (containerd dials 127.0.0.1 first, and
this one always answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from spinbox.api.forward import CONNECT_TIMEOUT, ForwardError, Splice
from spinbox.api.proto import agent_pb2
from spinbox.shim.container import Agent
from spinbox.ttrpc import TtrpcError

log = logging.getLogger(__name__)

T = TypeVar("T")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
CLONE_NEWNET = 0x40000000
RULE_COMMENT = "spinbox port-forward"
# Connections forwarded at once per pod; more are closed as they come.
MAX_CONNECTIONS = 64
IPTABLES_TIMEOUT = 30.0
# How long the guest may take to answer a new connection (its connect has CONNECT_TIMEOUT).
ANSWER_TIMEOUT = CONNECT_TIMEOUT + 20.0
# How long the guest may take to end a connection's input call once both sides said eof.
END_TIMEOUT = 10.0
_SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"


class PortForwardError(Exception):
    """Port-forward could not be set up for a pod; the sentence says why."""


def original_port(raw: bytes) -> int:
    """The destination port of a redirected connection, from SO_ORIGINAL_DST's
    struct sockaddr_in (family in host order, port and address in network order)."""
    if len(raw) < 8:
        raise ValueError(f"SO_ORIGINAL_DST gave {len(raw)} bytes, not a sockaddr_in")
    (family,) = struct.unpack_from("=H", raw, 0)
    port, address = struct.unpack_from("!H4s", raw, 2)
    if family != socket.AF_INET:
        raise ValueError(f"SO_ORIGINAL_DST gave address family {family}, not AF_INET")
    if socket.inet_ntoa(address) != "127.0.0.1" or port == 0:
        raise ValueError(f"the connection was for {socket.inet_ntoa(address)}:{port}, not 127.0.0.1")
    return int(port)


def redirect_rule(listen_port: int) -> list[str]:
    """The nat OUTPUT rule's match and target (after -A or -D)."""
    return [
        "OUTPUT",
        "-o", "lo",
        "-d", "127.0.0.1/32",
        "-p", "tcp",
        "-m", "comment", "--comment", RULE_COMMENT,
        "-j", "REDIRECT", "--to-ports", str(listen_port),
    ]  # fmt: skip


def in_netns(path: str, fn: Callable[[], T]) -> T:
    """Runs fn in a short-lived thread that enters the network namespace at `path`
    (a namespace is a thread's: the shim's own threads never change theirs)."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"cannot enter the network namespace {path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome.append(fn())
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=target, name="spinbox-portforward-netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(MAX_CONNECTIONS)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def iptables(netns: str, action: str, listen_port: int) -> tuple[int, str]:
    """Adds (-A) or deletes (-D) the redirect rule in the namespace: (exit status, stderr)."""
    tool = shutil.which("iptables", path=f"{os.environ.get('PATH', '')}:{_SBIN}") or "iptables"
    nsenter = shutil.which("nsenter", path=f"{os.environ.get('PATH', '')}:{_SBIN}") or "nsenter"
    argv = [nsenter, f"--net={netns}", tool, "-w", "10", "-t", "nat", action, *redirect_rule(listen_port)]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as error:
        return 127, f"cannot run {argv[0]}: {error.strerror}"
    try:
        async with asyncio.timeout(IPTABLES_TIMEOUT):
            _, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return -1, f"iptables did not finish within {IPTABLES_TIMEOUT:g} s"
    return proc.returncode or 0, err.decode(errors="replace").strip()


class PortForwarder:
    """One pod's port-forward: the listener in its namespace, the rule, the connections."""

    def __init__(self, netns: str, agent: Agent, pod: str, server: asyncio.Server, listen_port: int) -> None:
        self.netns = netns
        self.agent = agent
        self.pod = pod
        self.server = server
        self.listen_port = listen_port
        self.connections: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, netns: str, agent: Agent, pod: str) -> PortForwarder:
        loop = asyncio.get_running_loop()
        try:
            sock = await loop.run_in_executor(None, in_netns, netns, _listener)
        except OSError as error:
            raise PortForwardError(
                f"cannot listen for port-forward in the network namespace {netns} of pod {pod!r}: {error}"
            ) from None
        listen_port = sock.getsockname()[1]
        forwarder: PortForwarder | None = None

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert forwarder is not None
            await forwarder._accepted(reader, writer)

        try:
            server = await asyncio.start_server(accepted, sock=sock)
        except BaseException:
            sock.close()
            raise
        forwarder = cls(netns, agent, pod, server, listen_port)
        try:
            status, err = await iptables(netns, "-A", listen_port)
        except BaseException:  # a create given up: the listener goes with it
            server.close()
            raise
        if status != 0:
            server.close()
            raise PortForwardError(
                f"cannot add the port-forward rule to the network namespace {netns} of pod {pod!r}: {err}"
            )
        log.info("pod %r: port-forward listens on 127.0.0.1:%d in %s", pod, listen_port, netns)
        return forwarder

    async def close(self) -> None:
        """Stops listening, ends every forwarded connection and removes the rule."""
        self.server.close()
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.gather(*self.connections, return_exceptions=True)
        if not await asyncio.to_thread(os.path.exists, self.netns):
            return  # the rule went with the namespace
        status, err = await iptables(self.netns, "-D", self.listen_port)
        if status != 0 and await asyncio.to_thread(os.path.exists, self.netns):
            log.error(
                "could not remove the port-forward rule (to port %d) from the network namespace %s"
                " of pod %r: %s",
                self.listen_port,
                self.netns,
                self.pod,
                err,
            )

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.connections) >= MAX_CONNECTIONS:
            log.warning(
                "pod %r: port-forward refused a connection: %d are open already", self.pod, MAX_CONNECTIONS
            )
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            await self._forward(reader, writer)
        except asyncio.CancelledError:
            pass
        except (TtrpcError, ForwardError, PortForwardError) as error:
            log.warning("pod %r: %s", self.pod, error)
        except Exception:
            log.exception("pod %r: port-forward failed", self.pod)
        finally:
            self.connections.discard(task)
            writer.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            port = original_port(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))
        except (OSError, ValueError) as error:
            raise PortForwardError(
                f"port-forward cannot tell which port a connection was for: {error}"
            ) from None
        await self.relay(port, reader, writer)

    async def relay(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Splices one accepted connection with one to 127.0.0.1:`port` in the VM."""
        what = f"port-forward to port {port}"
        stream = self.agent.forward(port)
        try:
            try:
                async with asyncio.timeout(ANSWER_TIMEOUT):
                    first = await anext(stream)
            except TimeoutError:
                raise PortForwardError(f"{what}: the VM did not answer within {ANSWER_TIMEOUT:g} s") from None
            except StopAsyncIteration:
                raise PortForwardError(f"{what}: the VM ended the connection before it began") from None
            splice = Splice(reader, writer, what)
            await self._splice(splice, first.connection, stream)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def _splice(
        self, splice: Splice, connection: int, stream: AsyncIterator[agent_pb2.ForwardChunk]
    ) -> None:
        async def chunks() -> AsyncIterator[agent_pb2.ForwardChunk]:
            yield agent_pb2.ForwardChunk(connection=connection)
            async for message in splice.outgoing():
                yield message

        sending = asyncio.create_task(self.agent.forward_input(chunks()))
        pump = asyncio.create_task(splice.pump_local())
        try:
            await splice.consume(stream)
        finally:
            splice.end()
            pump.cancel()
            await asyncio.wait({pump, sending}, timeout=END_TIMEOUT)
            if not sending.done():
                sending.cancel()
                await asyncio.wait({sending})
                log.warning(
                    "pod %r: %s: the VM did not end the connection within %g s",
                    self.pod,
                    splice.what,
                    END_TIMEOUT,
                )
            elif not sending.cancelled() and sending.exception() is not None:
                log.warning("pod %r: %s: %s", self.pod, splice.what, sending.exception())
