"""bench/ttrpc: unary ttrpc round trips per second over a unix socket.

The baseline is the least any request/response protocol over asyncio streams
can cost: a length-prefixed echo over the same kind of socket, with the same
payload sizes, one request at a time. Both servers run in a child process
(as a real peer would), both clients in this one; each measurement runs for
a fixed time and reports calls per second.

Usage: bench/ttrpc [--seconds S] [--sizes 16,1024,65536] [--concurrency N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOP))

from google.protobuf.wrappers_pb2 import BytesValue  # noqa: E402

from spinbox.ttrpc import CallContext, Client, Server  # noqa: E402

SERVICE = "spinbox.bench.Echo"
LENGTH = struct.Struct(">I")


async def echo(req: BytesValue, ctx: CallContext) -> BytesValue:
    return req


async def serve_ttrpc(path: str) -> None:
    server = Server()
    server.add_unary(SERVICE, "Echo", BytesValue, echo)
    await server.serve_unix(path)
    await asyncio.Event().wait()


async def serve_raw(path: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (length,) = LENGTH.unpack(await reader.readexactly(4))
                writer.write(LENGTH.pack(length) + await reader.readexactly(length))
                await writer.drain()
        writer.close()

    await asyncio.start_unix_server(handle, path=path)
    await asyncio.Event().wait()


async def measure(seconds: float, once: Callable[[], Awaitable[object]], workers: int = 1) -> float:
    for _ in range(50):  # warm up
        await once()
    count = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < end:
            await once()
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return count / (time.perf_counter() - start)


async def ttrpc_rate(path: str, size: int, seconds: float, workers: int = 1) -> float:
    client = await Client.connect_unix(path)
    request = BytesValue(value=os.urandom(size))
    try:
        return await measure(seconds, lambda: client.call(SERVICE, "Echo", request, BytesValue), workers)
    finally:
        await client.close()


async def raw_rate(path: str, size: int, seconds: float) -> float:
    reader, writer = await asyncio.open_unix_connection(path)
    message = LENGTH.pack(size) + os.urandom(size)

    async def once() -> bytes:
        writer.write(message)
        await writer.drain()
        (length,) = LENGTH.unpack(await reader.readexactly(4))
        return await reader.readexactly(length)

    try:
        return await measure(seconds, once)
    finally:
        writer.close()


def start_server(kind: str, path: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(path)])
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"bench/ttrpc: the {kind} server did not start")
        time.sleep(0.02)
    return proc


async def bench(args: argparse.Namespace, work: Path) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    servers = {kind: start_server(kind, work / f"{kind}.sock") for kind in ("ttrpc", "raw")}
    try:
        print(f"unary round trips per second over a unix socket, {args.seconds} s per measurement")
        print(f"{'payload':>10} {'ttrpc':>12} {'raw echo':>12} {'ttrpc/raw':>10}")
        for size in sizes:
            ours = await ttrpc_rate(str(work / "ttrpc.sock"), size, args.seconds)
            base = await raw_rate(str(work / "raw.sock"), size, args.seconds)
            print(f"{size:>8} B {ours:>12.0f} {base:>12.0f} {ours / base:>10.2f}", flush=True)
        size = sizes[0]
        many = await ttrpc_rate(str(work / "ttrpc.sock"), size, args.seconds, args.concurrency)
        print(
            f"ttrpc with {args.concurrency} calls in flight on one connection ({size} B): {many:.0f} calls/s"
        )
    finally:
        for proc in servers.values():
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each measurement")
    parser.add_argument("--sizes", default="16,1024,65536", help="payload sizes in bytes, comma-separated")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight for the concurrent run")
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        kind, path = args.serve
        asyncio.run(serve_ttrpc(path) if kind == "ttrpc" else serve_raw(path))
        return
    with tempfile.TemporaryDirectory(prefix="sbx-bench-ttrpc-") as work:
        asyncio.run(bench(args, Path(work)))


if __name__ == "__main__":
    main()
