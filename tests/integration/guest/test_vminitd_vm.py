"""vminitd as PID 1 of a real TCG VM: the guest image from spinbox-mkguest, a busybox
rootfs as an EROFS image on virtio-blk (plus an ext4 upper), driven with AgentClient
over the virtio-serial agent channel. One VM serves the whole module.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from spinbox.agent import AgentClient
from spinbox.api import upper_format as wire
from spinbox.api.proto import agent_pb2 as pb
from spinbox.api.proto import ttrpc_pb2
from spinbox.ttrpc import Code, TtrpcError
from tests.integration.guest import drive, oci

machine = pytest.importorskip("spinbox.vm.machine", reason="the VM layer is not in this tree yet")
spec_module = pytest.importorskip("spinbox.vm.spec")

TOP = Path(__file__).resolve().parents[3]
T = TypeVar("T")
BOOT_TIMEOUT = 120.0


@dataclass
class GuestVM:
    loop: asyncio.AbstractEventLoop
    vm: Any
    agent: AgentClient
    upper_image: Path
    runtime_dir: Path

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    async def reconnect(self) -> None:
        await self.agent.close()
        self.agent = await AgentClient.connect(self.vm.agent_address)


def guest_kernels() -> list[Path]:
    """Debian's cloud kernel, and kernel/build's module-free kernel when it has been built here."""
    spinbox_kernel = TOP / "build" / "kernel" / "vmlinuz-spinbox"
    return [spec_module.default_kernel(), *([spinbox_kernel] if spinbox_kernel.is_file() else [])]


def build_images(work: Path, kernel: Path) -> tuple[Path, Path, Path]:
    initrd = work / "initrd.img"
    mkguest = [sys.executable, "-m", "guest.mkguest", "--kernel", str(kernel), "--output", str(initrd)]
    subprocess.run(mkguest, cwd=TOP, check=True)
    rootfs = oci.busybox_rootfs(work / "busybox")
    erofs = work / "busybox.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(erofs), str(rootfs)], check=True, capture_output=True)
    upper = work / "upper.ext4"
    with upper.open("wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(upper)], check=True, capture_output=True)
    return initrd, erofs, upper


@pytest.fixture(scope="module", params=guest_kernels(), ids=lambda kernel: kernel.name)
def guest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestVM]:
    kernel: Path = request.param
    work = tmp_path_factory.mktemp("guestvm")
    initrd, erofs, upper = build_images(work, kernel)
    runtime_dir = work / "vm"
    spec = spec_module.VmSpec(
        vm_id="guest-test",
        kernel=kernel,
        initrd=initrd,
        runtime_dir=runtime_dir,
        vcpus=1,
        memory_mib=512,
        accel="tcg",
        disks=(
            spec_module.Disk(erofs, "layer0", read_only=True),
            spec_module.Disk(upper, "upper0", read_only=False),
        ),
    )
    loop = asyncio.new_event_loop()
    vm = loop.run_until_complete(machine.launch(spec))
    try:
        loop.run_until_complete(vm.wait_ready(BOOT_TIMEOUT))
        agent = loop.run_until_complete(AgentClient.connect(vm.agent_address))
        g = GuestVM(loop, vm, agent, upper, runtime_dir)
        yield g
        loop.run_until_complete(g.agent.close())
    finally:
        if not vm.exited:
            loop.run_until_complete(vm.kill())
        loop.close()


def mount(g: GuestVM, cid: str, upper: bool = False) -> str:
    req = pb.MountRootfsRequest(
        container_id=cid, lowers=[pb.BlockDevice(serial="layer0", fstype="erofs", read_only=True)]
    )
    if upper:
        req.upper.CopyFrom(pb.BlockDevice(serial="upper0", fstype="ext4"))
    else:
        req.tmpfs_upper = True
    return g.run(g.agent.mount_rootfs(req))


def exec_process(*args: str, terminal: bool = False) -> bytes:
    return json.dumps(oci.process(*args, terminal=terminal)).encode()


def test_boot_timeline(guest: GuestVM) -> None:
    resp = guest.run(guest.agent.ping())
    t = resp.timeline
    assert 0 < t["exec"] <= t["entry"] <= t["modules"] <= t["agent-listening"] <= t["first-request"]
    # Block devices and file systems load while the agent serves; other requests wait for them.
    with pytest.raises(TtrpcError, match="no-such-container"):
        guest.run(guest.agent.pids("no-such-container"))
    t = guest.run(guest.agent.ping()).timeline
    assert t["modules"] <= t["modules-deferred"]
    print("guest timeline (s):", {k: round(v / 1e9, 3) for k, v in sorted(t.items(), key=lambda kv: kv[1])})


def test_loopback_is_up_without_any_network(guest: GuestVM) -> None:
    mount(guest, "lo")
    # As the shim asks for it: in the VM's own network namespace (with /sys to look).
    spec = json.loads(oci.spec("cat", "/sys/class/net/lo/flags"))
    spec["linux"]["namespaces"].remove({"type": "network"})
    spec["mounts"].append({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]})
    result = guest.run(drive.run(guest.agent, "lo", spec=json.dumps(spec).encode()))
    # IFF_UP | IFF_LOOPBACK: the container reaches its own 127.0.0.1.
    assert result == drive.Result(b"0x9\n", b"", 0)
    guest.run(guest.agent.unmount_rootfs("lo"))


def test_logs_reach_the_log_port(guest: GuestVM) -> None:
    async def read_logs() -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(guest.vm.log_socket))
        seen = b""
        try:
            while b"agent listening" not in seen:
                line = await reader.readline()
                assert line, "the log channel ended"
                seen += line
        finally:
            writer.close()
        return seen

    logs = guest.run(asyncio.wait_for(read_logs(), 60))
    lines = logs.splitlines()
    assert all(line[:1] == b"<" and line[2:3] == b">" for line in lines if not line.startswith(b" "))
    assert any(line.startswith(b"<6>loaded") and b"kernel modules" in line for line in lines)


def test_run_a_process_on_an_erofs_rootfs_with_an_ext4_upper(guest: GuestVM) -> None:
    path = mount(guest, "first", upper=True)
    assert path == "/run/spinbox/rootfs/first"
    cmd = "echo out; echo err >&2; echo kept > /written; exit 3"
    result = guest.run(drive.run(guest.agent, "first", "sh", "-c", cmd))
    assert result == drive.Result(b"out\n", b"err\n", 3)
    guest.run(guest.agent.sync_rootfs("first"))
    # The host reads the synced upper image: the write is there.
    shown = subprocess.run(
        ["debugfs", "-R", "cat /upper/written", str(guest.upper_image)], capture_output=True, check=True
    )
    assert shown.stdout == b"kept\n"
    guest.run(guest.agent.unmount_rootfs("first"))
    with pytest.raises(TtrpcError) as e:
        guest.run(guest.agent.unmount_rootfs("first"))
    assert e.value.code == Code.NOT_FOUND


def without_atimes(stream: bytes) -> bytes:
    """A writable layer's stream with its entries' access times zeroed (an export reads files)."""
    out = bytearray(stream)
    at = len(wire.MAGIC) + 1
    while at < len(out):
        kind, length = wire.RECORD_HEAD.unpack_from(out, at)
        at += wire.RECORD_HEAD.size
        if kind == wire.RecordType.ENTRY:
            head = list(wire.ENTRY_HEAD.unpack_from(out, at))
            head[4] = 0
            wire.ENTRY_HEAD.pack_into(out, at, *head)
        at += length
    return bytes(out)


def test_the_export_at_a_stop_ends_the_container_before_it_reads_the_layer(guest: GuestVM) -> None:
    mount(guest, "writer", upper=True)
    a = guest.agent

    async def export(end_container: bool) -> bytes:
        request = pb.ExportUpperRequest(container_id="writer", end_container=end_container)
        return b"".join([piece async for piece in a.export_upper(request, 60)])

    async def body() -> None:
        writes = "i=0; while :; do i=$((i+1)); echo $i > /count; done"
        await a.create_container("writer", oci.spec("sh", "-c", writes), pb.IoConfig())
        await a.start("writer")
        for _ in range(300):  # 30 s
            if b"count" in await export(False):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the container wrote nothing in 30 s")
        # While it runs, two exports differ; the one at a stop ends it first: nothing after it.
        assert without_atimes(await export(False)) != without_atimes(await export(False))
        last = await export(True)
        with pytest.raises(TtrpcError) as e:
            await a.pids("writer")
        assert e.value.code == Code.NOT_FOUND
        assert without_atimes(await export(False)) == without_atimes(last)
        with pytest.raises(TtrpcError) as e:
            await a.export_upper(pb.ExportUpperRequest(end_container=True), 60).__anext__()
        assert e.value.code == Code.INVALID_ARGUMENT
        await a.unmount_rootfs("writer")

    guest.run(body())


def test_exec_sigterm_pids_pause_and_stats(guest: GuestVM) -> None:
    mount(guest, "main")
    a = guest.agent

    async def body() -> None:
        init_pid = await a.create_container(
            "main",
            oci.spec("sh", "-c", "read x; echo got $x; sleep 1000"),
            pb.IoConfig(stdin=True, stdout=True),
        )
        await a.start("main")
        out = a.read_output("main")
        await a.exec("main", "e1", exec_process("sh", "-c", "echo second; exit 4"), pb.IoConfig(stdout=True))
        second = asyncio.ensure_future(drive.collect(a, "main", "e1"))
        await a.start("main", "e1")
        assert (await a.wait("main", "e1")).exit_status == 4
        assert await second == b"second\n"

        await a.exec("main", "e2", exec_process("sleep", "1000"))
        exec_pid = await a.start("main", "e2")
        pids = {p.pid: p.exec_id for p in await a.pids("main")}
        assert pids[init_pid] == "" and pids[exec_pid] == "e2"
        await a.signal("main", signal.SIGTERM, "e2")
        assert (await a.wait("main", "e2")).exit_status == 143

        # Paused, the container takes its input but cannot answer until resumed.
        await a.pause("main")
        await a.write_input("main", drive.feed(b"hello\n"), close_stdin=False)
        pending = asyncio.ensure_future(anext(out))
        done, _ = await asyncio.wait({pending}, timeout=1.0)
        assert not done
        await a.resume("main")
        assert await pending == b"got hello\n"

        await a.signal("main", signal.SIGKILL, all=True)
        assert (await a.wait("main")).exit_status == 137
        await a.delete_process("main", "e1")
        await a.delete_process("main", "e2")
        await a.delete_process("main")
        await a.unmount_rootfs("main")

    guest.run(body())


def test_stats_and_update_resources(guest: GuestVM) -> None:
    metrics_pb2 = pytest.importorskip("spinbox.api.proto.containerd.cgroups.v2.metrics_pb2")
    mount(guest, "stats")
    a = guest.agent

    async def body() -> bytes:
        script = "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; echo ready; sleep 1000"
        await a.create_container("stats", oci.spec("sh", "-c", script), pb.IoConfig(stdout=True))
        await a.start("stats")
        await drive.read_until(a.read_output("stats"), b"ready", bytearray())
        resources = {"memory": {"limit": 96 << 20, "swap": 96 << 20}, "pids": {"limit": 100}}
        await a.update_resources("stats", json.dumps(resources).encode())
        with pytest.raises(TtrpcError) as e:
            await a.update_resources("stats", b"[]")
        assert e.value.code == Code.INVALID_ARGUMENT
        metrics = await a.stats("stats")
        await a.delete_container("stats")
        await a.unmount_rootfs("stats")
        return metrics

    m = metrics_pb2.Metrics.FromString(guest.run(body()))
    assert m.memory.usage > 0
    assert m.cpu.usage_usec > 0
    assert m.pids.current >= 1
    assert m.memory.usage_limit == 96 << 20
    assert m.pids.limit == 100


def test_terminal_and_resize(guest: GuestVM) -> None:
    mount(guest, "tty")
    guest.run(drive.terminal_session(guest.agent, "tty"))
    guest.run(guest.agent.unmount_rootfs("tty"))


def test_memory_limit_oom_event(guest: GuestVM) -> None:
    mount(guest, "oom")
    a = guest.agent

    async def body() -> pb.Event:
        events = a.events()
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)
        spec = oci.spec("dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1", memory_limit=32 << 20)
        await a.create_container("oom", spec)
        await a.start("oom")
        assert (await a.wait("oom")).exit_status == 137
        event = await asyncio.wait_for(first, 60)
        await a.delete_process("oom")
        await a.unmount_rootfs("oom")
        return event

    event = guest.run(body())
    assert event.oom.container_id == "oom"


def test_missing_binary_and_bad_requests(guest: GuestVM) -> None:
    mount(guest, "bad")
    a = guest.agent

    async def body() -> list[TtrpcError]:
        errors = []
        for attempt in (
            a.create_container("bad", oci.spec("/usr/bin/nosuch")),
            a.create_container("bad/..", oci.spec("true")),
            a.mount_rootfs(
                pb.MountRootfsRequest(
                    container_id="x", lowers=[pb.BlockDevice(serial="nope", fstype="erofs")]
                )
            ),
            a.mount_rootfs(
                pb.MountRootfsRequest(
                    container_id="y", lowers=[pb.BlockDevice(serial="layer0", fstype="vfat")]
                )
            ),
        ):
            with pytest.raises(TtrpcError) as e:
                await attempt
            errors.append(e.value)
        await a.unmount_rootfs("bad")
        return errors

    errors = guest.run(body())
    assert "'/usr/bin/nosuch'" in errors[0].message
    assert errors[1].code == Code.INVALID_ARGUMENT
    assert errors[2].code == Code.NOT_FOUND and "'nope'" in errors[2].message
    assert "'vfat'" in errors[3].message


def test_garbage_on_the_agent_channel(guest: GuestVM) -> None:
    guest.run(guest.agent.close())
    path = guest.vm.agent_address.removeprefix("unix:")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        # A well-framed request that is not a ttrpc Request gets an error back.
        s.sendall(b"\x00\x00\x00\x08\x00\x00\x00\x01\x01\x00garbage!")
        header = recv_exactly(s, 10)
        length, stream_id, kind = (
            int.from_bytes(header[:4], "big"),
            int.from_bytes(header[4:8], "big"),
            header[8],
        )
        assert (stream_id, kind) == (1, 2)
        response = ttrpc_pb2.Response.FromString(recv_exactly(s, length))
        assert response.status.code == Code.INVALID_ARGUMENT
        # Bytes that are no frame at all are dropped.
        s.sendall(b"\xff" * 64 + os.urandom(512))

    # The guest drops the garbage up to the next client's first request.
    guest.run(guest.reconnect())
    assert guest.run(asyncio.wait_for(guest.agent.ping(), 60)).version


def recv_exactly(s: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = s.recv(size - len(data))
        assert chunk, "the agent closed the channel"
        data += chunk
    return data


def test_zz_shutdown_leaves_nothing(guest: GuestVM) -> None:
    mount(guest, "last")
    guest.run(guest.agent.create_container("last", oci.spec("sleep", "1000")))
    guest.run(guest.agent.start("last"))
    pid = guest.vm.pid
    guest.run(guest.vm.shutdown(60))
    assert guest.vm.exited
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not list(guest.runtime_dir.glob("*.sock"))
