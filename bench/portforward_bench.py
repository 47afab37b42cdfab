"""bench/portforward: port-forward's throughput through the relay, against a plain TCP connection.

A child process stands in for the guest: vminitd's Forwarder (the agent's
Forward and ForwardInput) served by spinbox's ttrpc on a unix socket, as over a
virtio-serial port's host end, and two TCP servers on 127.0.0.1: a sink that
reads to end of file and answers the byte count, and a source that sends the
asked number of bytes. This process relays a socket pair through the shim's
PortForwarder, as it relays a client's connection. The baseline is the same
client on a plain TCP connection to the same servers, in the same run. Neither
includes a VM: this is the relay's own cost (framing, windows, asyncio).

Usage: bench/portforward [--mib N] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOP))

from guest.vminitd.forward import Forwarder  # noqa: E402
from spinbox.agent import SERVICE, AgentClient  # noqa: E402
from spinbox.api.proto import agent_pb2 as pb  # noqa: E402
from spinbox.shim.portforward import PortForwarder  # noqa: E402
from spinbox.ttrpc import Server  # noqa: E402

COUNT = struct.Struct(">Q")
BLOCK = 1 << 16


async def serve(path: str, ports_file: str) -> None:
    """The guest's side: the agent's forwarding methods, a sink and a source."""
    forwarder = Forwarder()
    server = Server()
    server.add_server_stream(SERVICE, "Forward", pb.ForwardRequest, lambda r, c: forwarder.forward(r))

    async def forward_input(requests: object, ctx: object) -> object:
        return await forwarder.forward_input(requests)  # type: ignore[arg-type]

    server.add_client_stream(SERVICE, "ForwardInput", pb.ForwardChunk, forward_input)

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(BLOCK):
            total += len(data)
        writer.write(COUNT.pack(total))
        writer.close()

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (size,) = COUNT.unpack(await reader.readexactly(COUNT.size))
        block = bytes(BLOCK)
        while size > 0:
            writer.write(block[: min(size, BLOCK)])
            size -= min(size, BLOCK)
            await writer.drain()
        writer.close()

    sinks = await asyncio.start_server(sink, "127.0.0.1", 0)
    sources = await asyncio.start_server(source, "127.0.0.1", 0)
    await server.serve_unix(path)
    ports = f"{sinks.sockets[0].getsockname()[1]} {sources.sockets[0].getsockname()[1]}"
    await asyncio.to_thread(Path(ports_file).write_text, ports)
    await asyncio.Event().wait()


async def upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
    block = bytes(BLOCK)
    sent = 0
    while sent < size:
        writer.write(block[: min(size - sent, BLOCK)])
        sent += min(size - sent, BLOCK)
        await writer.drain()
    writer.write_eof()
    (got,) = COUNT.unpack(await reader.readexactly(COUNT.size))
    assert got == size, (got, size)


async def download(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
    writer.write(COUNT.pack(size))
    got = 0
    while data := await reader.read(BLOCK):
        got += len(data)
    assert got == size, (got, size)


async def measure(args: argparse.Namespace, path: str, sink: int, source: int) -> None:
    agent = await AgentClient.connect(f"unix:{path}")
    idle = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    forwarder = PortForwarder(agent, "bench", idle, 0)
    size = args.mib << 20

    async def relayed(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[None]]:
        ours, theirs = socket.socketpair()
        r, w = await asyncio.open_connection(sock=theirs)

        async def relay() -> None:
            try:
                await forwarder.relay(port, r, w)
            finally:
                w.close()

        task = asyncio.create_task(relay())
        reader, writer = await asyncio.open_connection(sock=ours)
        return reader, writer, task

    results: dict[str, list[float]] = {}
    for _ in range(args.runs):
        for direction, port, work in (("host->guest", sink, upload), ("guest->host", source, download)):
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await work(reader, writer, size)
            writer.close()
            results.setdefault(f"{direction} plain TCP", []).append(
                args.mib / (time.perf_counter() - started)
            )
            started = time.perf_counter()
            reader, writer, task = await relayed(port)
            await work(reader, writer, size)
            writer.close()
            await task
            results.setdefault(f"{direction} port-forward", []).append(
                args.mib / (time.perf_counter() - started)
            )
    for name, values in results.items():
        print(f"{name:28} median {statistics.median(values):8.1f} MiB/s  (runs: {len(values)})")
    idle.close()
    await agent.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve", nargs=2, metavar=("SOCKET", "PORTS_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(*args.serve))
        return 0
    with tempfile.TemporaryDirectory(prefix="spinbox-bench-pf-") as tmp:
        path, ports_file = os.path.join(tmp, "agent.sock"), os.path.join(tmp, "ports")
        child = subprocess.Popen([sys.executable, __file__, "--serve", path, ports_file])
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(ports_file) or not Path(ports_file).read_text():
                if child.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("bench/portforward: the guest stand-in did not start")
                time.sleep(0.05)
            sink, source = (int(p) for p in Path(ports_file).read_text().split())
            print(f"bench/portforward: {args.mib} MiB per run, {args.runs} runs, relay without a VM")
            asyncio.run(measure(args, path, sink, source))
        finally:
            child.kill()
            child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
