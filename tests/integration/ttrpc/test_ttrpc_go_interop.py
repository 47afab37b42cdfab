"""spinbox.ttrpc against containerd's Go ttrpc (v1.2, with streaming), both
ways: our client with a Go server, a Go client with our server.

The Go peer is built from tests/integration/ttrpc/gopeer with the Go module
cache only; without Go or the cached modules the test is skipped."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.wrappers_pb2 import Int64Value, StringValue

from spinbox.ttrpc import Client, Code, Server, TtrpcError
from tests.unit.ttrpc.echo_service import SERVICE, EchoService

PEER_SOURCE = Path(__file__).parent / "gopeer"


@pytest.fixture(scope="module")
def gopeer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # The host's Go, or the one tools/install-test-clients fetched where the host has none.
    go = shutil.which("go") or shutil.which("go", path="/opt/spinbox-test/go/bin")
    if go is None:
        pytest.skip("no Go toolchain")
    binary = tmp_path_factory.mktemp("gopeer") / "gopeer"
    env = {**os.environ, "GOFLAGS": "-mod=readonly", "GOPROXY": "off", "GOTOOLCHAIN": "local"}
    build = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=PEER_SOURCE, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if build.returncode != 0:
        pytest.skip(f"cannot build the Go ttrpc peer offline: {build.stderr.strip()[-500:]}")
    yield binary


def test_our_client_with_a_go_server(gopeer: Path, tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "go.sock"
        peer = await asyncio.create_subprocess_exec(gopeer, "serve", str(path), stdout=subprocess.PIPE)
        try:
            assert peer.stdout is not None
            assert await peer.stdout.readline() == b"ready\n"
            client = await Client.connect_unix(path)
            assert (await client.call(SERVICE, "Echo", StringValue(value="py"), StringValue)).value == "go:py"
            count = client.server_stream(SERVICE, "Count", Int64Value(value=5), Int64Value)
            assert [m.value async for m in count] == [0, 1, 2, 3, 4]
            empty = client.server_stream(SERVICE, "Count", Int64Value(), Int64Value)
            assert [m.value async for m in empty] == []
            numbers = [Int64Value(value=i) for i in range(1, 11)]
            assert (await client.client_stream(SERVICE, "Sum", numbers, Int64Value)).value == 55
            assert (await client.client_stream(SERVICE, "Sum", [], Int64Value)).value == 0
            with pytest.raises(TtrpcError) as err:
                await client.call(SERVICE, "Nope", StringValue(), StringValue)
            assert err.value.code is Code.UNIMPLEMENTED
            calls = [client.call(SERVICE, "Echo", StringValue(value=str(i)), StringValue) for i in range(300)]
            assert [r.value for r in await asyncio.gather(*calls)] == [f"go:{i}" for i in range(300)]
            await client.close()
        finally:
            peer.kill()
            await peer.wait()

    asyncio.run(main())


def test_a_go_client_with_our_server(gopeer: Path, tmp_path: Path) -> None:
    async def main() -> str:
        server = Server()
        EchoService().register(server)
        await server.serve_unix(tmp_path / "py.sock")
        try:
            peer = await asyncio.create_subprocess_exec(
                gopeer, "client", str(tmp_path / "py.sock"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            out, _ = await asyncio.wait_for(peer.communicate(), 60)
            assert peer.returncode == 0, out.decode()
            return out.decode()
        finally:
            await server.close()

    assert asyncio.run(main()).splitlines() == [
        "echo from-go",
        "fail rpc error: code = NotFound desc = no container c9",
        "count [0 1 2 3]",
        "sum 55",
        "countfail 0",
        "countfail 1",
        "countfail end rpc error: code = DataLoss desc = ran out",
    ]
