"""Port-forward into a pod's VM: the pod's localhost on the host reaches the VM's.

containerd's CRI PortForward (kubectl and crictl port-forward) enters the
pod's network namespace on the host and connects to localhost:PORT there; the
pod's traffic goes to the VM, so nothing would answer. For each pod, spinboxd
(which owns the pod's network plumbing) listens on one port of 127.0.0.1
inside that namespace, adds an iptables nat OUTPUT rule there that redirects
every TCP connection to 127.0.0.1 to it (spinbox.net.portforward), and hands
the listening socket to the shim (VM.OpenPortForward, a file descriptor over
D-Bus). The shim accepts on it, reads the port each connection was for
(SO_ORIGINAL_DST, an option of the accepted socket) and splices it with a
connection vminitd opens to 127.0.0.1:PORT in the VM, over the agent channel
the shim already holds (spinbox.api.forward): a server bound to the pod's
localhost answers as with runc, and so does one bound to 0.0.0.0.

The shim relays because it lives exactly as long as the pod and is the
agent's client (a virtio-serial agent port has one client), and it already
carries the pod's stdio bytes: forwarded bytes never pass through spinboxd,
and a restart of spinboxd leaves the listener the shim holds working. The
shim itself never enters the namespace. The rule goes when spinboxd releases
the VM (and with the namespace, which containerd removes with the pod). Only
TCP is forwarded, as the CRI's PortForward is; a connection to ::1 is not
redirected (containerd dials 127.0.0.1 first, and this one always answers).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator

from spinbox.api.forward import CONNECT_TIMEOUT, ForwardError, Splice
from spinbox.api.proto import agent_pb2
from spinbox.shim.container import Agent
from spinbox.ttrpc import TtrpcError

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
# Connections forwarded at once per pod; more are closed as they come.
MAX_CONNECTIONS = 64
# How long the guest may take to answer a new connection (its connect has CONNECT_TIMEOUT).
ANSWER_TIMEOUT = CONNECT_TIMEOUT + 20.0
# How long the guest may take to end a connection's input call once both sides said eof.
END_TIMEOUT = 10.0


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


def listening_socket(fd: int, where: str) -> socket.socket:
    """The socket object for the listener's fd (taking it over), checked to be a
    listening TCP socket on 127.0.0.1."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        os.close(fd)
        raise PortForwardError(f"the port-forward listener for {where} is not a socket: {error}") from None
    try:
        address = sock.getsockname()
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM or not listening:
            raise PortForwardError(f"the port-forward listener for {where} is not a listening TCP socket")
        if address[0] != "127.0.0.1":
            raise PortForwardError(f"the port-forward listener for {where} is on {address[0]}, not 127.0.0.1")
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class PortForwarder:
    """One pod's port-forward: the listener spinboxd opened in its namespace, the connections."""

    def __init__(self, agent: Agent, pod: str, server: asyncio.Server, listen_port: int) -> None:
        self.agent = agent
        self.pod = pod
        self.server = server
        self.listen_port = listen_port
        self.connections: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, fd: int, netns: str, agent: Agent, pod: str) -> PortForwarder:
        """Serves the listener `fd` (spinboxd's VM.OpenPortForward, taken over)."""
        sock = listening_socket(fd, f"the network namespace {netns} of pod {pod!r}")
        listen_port = int(sock.getsockname()[1])
        forwarder: PortForwarder | None = None

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert forwarder is not None
            await forwarder._accepted(reader, writer)

        try:
            server = await asyncio.start_server(accepted, sock=sock)
        except BaseException:
            sock.close()
            raise
        forwarder = cls(agent, pod, server, listen_port)
        log.info("pod %r: port-forward accepts on 127.0.0.1:%d in %s", pod, listen_port, netns)
        return forwarder

    async def close(self) -> None:
        """Stops accepting and ends every forwarded connection (spinboxd removes the rule
        when it releases the VM)."""
        self.server.close()
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.gather(*self.connections, return_exceptions=True)

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
