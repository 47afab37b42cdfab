"""Our ttrpc client against a real containerd: a task event forwarded into
containerd's ttrpc socket shows up in `ctr events`."""

from __future__ import annotations

import asyncio
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from spinbox.api import typeurl
from spinbox.api.proto.containerd.events import task_pb2
from spinbox.api.proto.containerd.services.ttrpc.events.v1 import events_pb2
from spinbox.ttrpc import Client, Code, TtrpcError

EVENTS = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Containerd:
    address: str
    log: Path

    @property
    def ttrpc_address(self) -> str:
        return self.address + ".ttrpc"

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", self.address, *args], capture_output=True, text=True, check=True
        )


def wait_for(what: str, ready: object, log: Path | None = None) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not callable(ready) or not ready():
        if time.monotonic() > deadline:
            detail = log.read_text()[-2000:] if log and log.exists() else ""
            raise AssertionError(f"{what} not ready after {READY_TIMEOUT} s\n{detail}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.skip("containerd is not installed")
    # A short directory: unix socket paths are limited to 108 bytes.
    top = Path(tempfile.mkdtemp(prefix="sbx-ctrd-"))
    address = str(top / "containerd.sock")
    config = top / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{top / "root"}"\n'
        f'state = "{top / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{address}"\n'
        f'[ttrpc]\n  address = "{address}.ttrpc"\n'
        # Keeps containerd from creating /opt/containerd on the host.
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{top / "opt"}"\n'
    )
    log = top / "containerd.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["containerd", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT, text=True
        )
    try:
        wait_for("containerd", lambda: proc.poll() is None and Path(address + ".ttrpc").exists(), log)
        yield Containerd(address, log)
        assert proc.poll() is None, "containerd died during the test:\n" + log.read_text()[-3000:]
    finally:
        stop(proc)
        shutil.rmtree(top, ignore_errors=True)


class EventWatch:
    """`ctr events` in the background, its lines collected as they come."""

    def __init__(self, containerd: Containerd) -> None:
        self.proc = subprocess.Popen(
            ["ctr", "--address", containerd.address, "events"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.lines: list[str] = []
        self._partial = ""

    def poll(self) -> list[str]:
        assert self.proc.stdout is not None
        for _ in self.selector.select(timeout=0.05):
            chunk = self.proc.stdout.read() or ""
            *complete, self._partial = (self._partial + chunk).split("\n")
            self.lines.extend(complete)
        return self.lines

    def close(self) -> None:
        self.selector.close()
        stop(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def events(containerd: Containerd) -> Iterator[EventWatch]:
    watch = EventWatch(containerd)
    try:
        # ctr gives no sign that it has subscribed: create namespaces until
        # one of their events comes through.
        probes = iter(range(1000))

        def subscribed() -> bool:
            containerd.ctr("namespaces", "create", f"probe-{next(probes)}")
            return any("/namespaces/create" in line for line in watch.poll())

        wait_for("ctr events", subscribed, containerd.log)
        yield watch
    finally:
        watch.close()


async def forward(
    containerd: Containerd, namespace: str, event: task_pb2.TaskExit | task_pb2.TaskOOM
) -> None:
    client = await Client.connect_unix(containerd.ttrpc_address)
    try:
        request = events_pb2.ForwardRequest(envelope=typeurl.envelope(namespace, event))
        await client.call(
            EVENTS, "Forward", request, empty_pb2.Empty, timeout=10, metadata={NAMESPACE_KEY: namespace}
        )
    finally:
        await client.close()


def test_forwarded_task_events_show_in_ctr_events(containerd: Containerd, events: EventWatch) -> None:
    exit_event = task_pb2.TaskExit(container_id="made-up-7", id="made-up-7", pid=4242, exit_status=137)
    exit_event.exited_at.FromSeconds(1_700_000_000)
    asyncio.run(forward(containerd, "spinbox-test", exit_event))
    asyncio.run(forward(containerd, "spinbox-test", task_pb2.TaskOOM(container_id="made-up-8")))

    def shown() -> bool:
        return sum("spinbox-test" in line for line in events.poll()) >= 2

    wait_for("the forwarded events", shown, containerd.log)
    ours = [line for line in events.lines if "spinbox-test" in line]
    assert " spinbox-test /tasks/exit " in ours[0]
    assert '"container_id":"made-up-7"' in ours[0]
    assert '"pid":4242' in ours[0]
    assert '"exit_status":137' in ours[0]
    assert " spinbox-test /tasks/oom " in ours[1]
    assert '"container_id":"made-up-8"' in ours[1]


def test_containerd_errors_decode_as_status_codes(containerd: Containerd) -> None:
    async def main() -> None:
        client = await Client.connect_unix(containerd.ttrpc_address)
        try:
            with pytest.raises(TtrpcError) as err:
                await client.call(EVENTS, "NoSuchMethod", events_pb2.ForwardRequest(), empty_pb2.Empty)
            assert err.value.code is Code.UNIMPLEMENTED
            assert "NoSuchMethod" in err.value.message
            # The connection stays usable after the error.
            event = task_pb2.TaskOOM(container_id="x")
            request = events_pb2.ForwardRequest(envelope=typeurl.envelope("spinbox-test", event))
            calls = [
                client.call(
                    EVENTS, "Forward", request, empty_pb2.Empty, metadata={NAMESPACE_KEY: "spinbox-test"}
                )
                for _ in range(20)
            ]
            assert len(await asyncio.gather(*calls)) == 20
        finally:
            await client.close()

    asyncio.run(main())
