"""vminitd's agent service on the host (not as PID 1), driven with AgentClient,
running real busybox containers with crun.

crun refuses this host's v1/v2 cgroup hybrid, so the agent runs in a private
mount namespace with cgroup2 alone at /sys/fs/cgroup and crun manages no
cgroups (pause, stats and OOM events are covered by the VM tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spinbox.agent import SERVICE, AgentClient
from spinbox.api.proto import agent_pb2 as pb
from spinbox.ttrpc import Code, TtrpcError
from tests.integration.guest import drive, oci

TOP = Path(__file__).resolve().parents[3]


@dataclass
class HostAgent:
    address: str
    state: Path
    proc: subprocess.Popen[bytes]

    def rootfs(self, cid: str) -> None:
        oci.busybox_rootfs(self.state / "rootfs" / cid)

    def crun_list(self) -> str:
        return subprocess.run(
            ["crun", "--root", str(self.state / "crun"), "list", "-q"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostAgent]:
    state = tmp_path_factory.mktemp("vminitd")
    sock = state / "agent.sock"
    argv = [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", 'mount -t cgroup2 none /sys/fs/cgroup && exec "$@"', "sh",
        sys.executable, "-m", "guest.vminitd",
        "--listen", f"unix:{sock}",
        "--state-dir", str(state),
        "--crun-arg=--cgroup-manager=disabled",
        "--cgroup-parent=",
    ]  # fmt: skip
    log = (state / "vminitd.log").open("wb")
    proc = subprocess.Popen(argv, cwd=TOP, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not sock.exists():
            assert proc.poll() is None, (state / "vminitd.log").read_text()
            time.sleep(0.05)
        yield HostAgent(f"unix:{sock}", state, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()


def call(host: HostAgent, body: object) -> object:
    async def main() -> object:
        agent = await AgentClient.connect(host.address)
        try:
            return await body(agent)  # type: ignore[operator]
        finally:
            await agent.close()

    return asyncio.run(main())


def test_ping_has_a_timeline(agent: HostAgent) -> None:
    async def body(a: AgentClient) -> pb.PingResponse:
        return await a.ping()

    resp = call(agent, body)
    assert isinstance(resp, pb.PingResponse)
    assert resp.version
    assert resp.timeline["entry"] <= resp.timeline["agent-listening"] <= resp.timeline["first-request"]


def test_ping_returns_its_nonce_and_a_fence_reads_past_nothing(agent: HostAgent) -> None:
    async def body(a: AgentClient) -> tuple[bytes, str]:
        echoed = (
            await a.client.call(SERVICE, "Ping", pb.PingRequest(nonce=b"n" * 64), pb.PingResponse)
        ).nonce
        with pytest.raises(TtrpcError) as raised:
            await a.client.call(SERVICE, "Ping", pb.PingRequest(nonce=b"n" * 65), pb.PingResponse)
        await a.fence()
        return echoed, raised.value.message

    echoed, refusal = call(agent, body)  # type: ignore[misc]
    assert echoed == b"n" * 64
    assert "a Ping's nonce is at most 64 bytes, not 65" in refusal


def test_stdout_stderr_and_exit_code(agent: HostAgent) -> None:
    agent.rootfs("hello")

    async def body(a: AgentClient) -> drive.Result:
        return await drive.run(a, "hello", "sh", "-c", "echo out; echo err >&2; exit 3")

    result = call(agent, body)
    assert result == drive.Result(b"out\n", b"err\n", 3)
    assert "hello" not in agent.crun_list()
    assert not (agent.state / "bundles" / "hello").exists()


def test_stdin_reaches_the_process(agent: HostAgent) -> None:
    agent.rootfs("cat")
    data = b"".join(b"line %d\n" % i for i in range(20000))  # more than a pipe holds

    async def body(a: AgentClient) -> drive.Result:
        return await drive.run(a, "cat", "cat", stdin=data)

    result = call(agent, body)
    assert isinstance(result, drive.Result)
    assert result.status == 0
    assert result.stdout == data


def test_exec_signal_and_pids(agent: HostAgent) -> None:
    agent.rootfs("sleeper")

    async def body(a: AgentClient) -> None:
        init_pid = await a.create_container("sleeper", oci.spec("sleep", "1000"))
        assert await a.start("sleeper") == init_pid
        io = pb.IoConfig(stdout=True, stderr=True)
        await a.exec("sleeper", "e1", json_process("sh", "-c", "echo from exec; exit 7"), io)
        out = asyncio.ensure_future(drive.collect(a, "sleeper", "e1"))
        await a.start("sleeper", "e1")
        assert (await a.wait("sleeper", "e1")).exit_status == 7
        assert await out == b"from exec\n"
        assert (await a.delete_process("sleeper", "e1")).exit_status == 7

        # SIGTERM ends an ordinary process: the shell's 128+15.
        await a.exec("sleeper", "e2", json_process("sleep", "1000"))
        exec_pid = await a.start("sleeper", "e2")
        pids = {p.pid: p.exec_id for p in await a.pids("sleeper")}
        assert pids[init_pid] == ""
        assert pids[exec_pid] == "e2"
        await a.signal("sleeper", signal.SIGTERM, "e2")
        assert (await a.wait("sleeper", "e2")).exit_status == 143

        # The init of a pid namespace ignores SIGTERM without a handler; SIGKILL ends it.
        await a.signal("sleeper", signal.SIGKILL)
        waited = await a.wait("sleeper")
        assert waited.exit_status == 137
        assert waited.pid == init_pid
        assert waited.exited_at.seconds > 0
        with pytest.raises(TtrpcError) as e:
            await a.signal("sleeper", signal.SIGKILL)
        assert e.value.code == Code.NOT_FOUND
        await a.delete_container("sleeper")

    call(agent, body)
    assert "sleeper" not in agent.crun_list()


def json_process(*args: str, terminal: bool = False) -> bytes:
    return json.dumps(oci.process(*args, terminal=terminal)).encode()


def test_terminal_and_resize(agent: HostAgent) -> None:
    agent.rootfs("tty")

    call(agent, lambda a: drive.terminal_session(a, "tty"))


def test_bad_requests_get_sentences(agent: HostAgent) -> None:
    agent.rootfs("bad")

    async def body(a: AgentClient) -> list[tuple[Code, str]]:
        errors = []
        attempts = [
            a.create_container("../etc", oci.spec("true")),
            a.create_container("x" * 200, oci.spec("true")),
            a.create_container("bad", b"{not json"),
            a.create_container("bad", oci.spec("/no/such/program")),
            a.create_container("bad", oci.spec("nosuchprogram")),
            a.create_container("norootfs", oci.spec("true")),
            a.start("missing"),
            a.signal("bad", 0),
            a.resize_pty("bad", 0, 0),
            a.wait("missing", "x/y"),
            a.stats("missing"),
        ]
        for attempt in attempts:
            try:
                await attempt
            except TtrpcError as e:
                errors.append((e.code, e.message))
            else:
                errors.append((Code.OK, ""))
        await a.ping()  # still serving
        return errors

    errors = call(agent, body)
    assert isinstance(errors, list)
    codes = [code for code, _ in errors]
    assert codes[:5] == [Code.INVALID_ARGUMENT] * 5
    assert "container id '../etc'" in errors[0][1]
    assert "200 characters" in errors[1][1]
    assert "not valid JSON" in errors[2][1]
    assert "'/no/such/program'" in errors[3][1]
    assert "'nosuchprogram'" in errors[4][1]
    assert codes[5] == Code.FAILED_PRECONDITION
    assert "no rootfs" in errors[5][1]
    assert codes[6] == Code.NOT_FOUND
    assert codes[7:] == [Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.INVALID_ARGUMENT, Code.NOT_FOUND]
    assert "signal 0" in errors[7][1]
    assert "bad" not in agent.crun_list()


def test_garbage_on_the_socket(agent: HostAgent) -> None:
    path = agent.address.removeprefix("unix:")
    for junk in (
        b"\xff" * 10 + os.urandom(300),
        b"\x00\x00\x00\x05\x00\x00\x00\x01\x01\x00hello",
        os.urandom(4096),
    ):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(junk)
            s.settimeout(5)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                s.recv(4096)

    async def body(a: AgentClient) -> pb.PingResponse:
        return await a.ping()

    assert isinstance(call(agent, body), pb.PingResponse)
    assert agent.proc.poll() is None


def test_exec_on_a_terminal_and_close_stdin(agent: HostAgent) -> None:
    agent.rootfs("shell")

    async def body(a: AgentClient) -> None:
        await a.create_container("shell", oci.spec("cat"), pb.IoConfig(stdin=True, stdout=True))
        out = asyncio.ensure_future(drive.collect(a, "shell"))
        await a.start("shell")
        io = pb.IoConfig(stdin=True, stdout=True, terminal=True)
        await a.exec("shell", "t1", json_process("sh", "-c", "read x; stty size; exit 2", terminal=True), io)
        await a.start("shell", "t1")
        await a.resize_pty("shell", width=50, height=20, exec_id="t1")
        await a.write_input("shell", drive.feed(b"go\n"), exec_id="t1", close_stdin=False)
        await drive.read_until(a.read_output("shell", "t1"), b"20 50", bytearray())
        assert (await a.wait("shell", "t1")).exit_status == 2
        # The init's stdin: data, then CloseStdin ends cat.
        await a.write_input("shell", drive.feed(b"to cat\n"), close_stdin=False)
        await a.close_stdin("shell")
        assert (await a.wait("shell")).exit_status == 0
        assert await out == b"to cat\n"
        await a.delete_container("shell")

    call(agent, body)


def test_zz_shutdown_stops_the_agent(agent: HostAgent) -> None:
    agent.rootfs("last")

    async def body(a: AgentClient) -> None:
        await a.create_container("last", oci.spec("sleep", "1000"))
        await a.start("last")
        await a.shutdown()

    call(agent, body)
    assert agent.proc.wait(timeout=60) == 0
    assert agent.crun_list().strip() == ""
    assert not Path(agent.address.removeprefix("unix:")).exists()
