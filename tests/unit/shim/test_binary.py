"""The shim binary as containerd runs it: `start` prints an address where the
server answers both task API versions, Shutdown ends it and removes its
socket, `delete` prints a DeleteResponse, `-v` names the runtime."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spinbox.shim import released
from spinbox.shim.protos import Empty, task
from spinbox.ttrpc import Client, Code, TtrpcError

TOP = Path(__file__).resolve().parents[3]


def shim(*args: str, bundle: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "spinbox.shim", *args],
        cwd=bundle,
        env={**os.environ, "PYTHONPATH": str(TOP), **env},
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # Unix socket paths must stay short: not under pytest's tmp_path.
    with tempfile.TemporaryDirectory(prefix="sbx-") as path:
        try:
            yield path
        finally:
            # A server that a failed test did not shut down names its socket under path.
            for proc in Path("/proc").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    if proc.name.isdigit() and path.encode() in (proc / "cmdline").read_bytes():
                        os.kill(int(proc.name), signal.SIGKILL)


def make_bundle(tmp_path: Path, socket_dir: str = "/nonexistent") -> tuple[Path, dict[str, str]]:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": {}}))
    env = {
        "SPINBOX_SHIM_SOCKET_DIR": socket_dir,
        "TTRPC_ADDRESS": str(tmp_path / "no-containerd.ttrpc"),
        "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus",
    }
    return bundle, env


def test_start_serves_v2_and_v3_until_shutdown(tmp_path: Path, socket_dir: str) -> None:
    bundle, env = make_bundle(tmp_path, socket_dir)
    args = ("-namespace", "unit", "-id", "c1", "-address", str(tmp_path / "containerd.sock"), "start")
    result = shim(*args, bundle=bundle, env={**env, "MAX_SHIM_VERSION": "2"})
    assert result.returncode == 0, result.stderr
    params = json.loads(result.stdout)
    assert params["version"] == 2 and params["protocol"] == "ttrpc"
    socket_path = Path(params["address"].removeprefix("unix://"))
    assert (bundle / "address").read_text() == params["address"]

    # A second start for the same id finds the running shim.
    again = shim(*args, bundle=bundle, env=env)
    assert again.stdout.decode() == params["address"]

    async def talk() -> tuple[int, str, str]:
        client = await Client.connect_unix(str(socket_path))
        try:
            connected = await client.call(
                "containerd.task.v2.Task", "Connect", task.ConnectRequest(id="c1"), task.ConnectResponse
            )
            try:
                await client.call(
                    "containerd.task.v3.Task", "State", task.StateRequest(id="c1"), task.StateResponse
                )
            except TtrpcError as error:
                state_error = (error.code.name, error.message)
            await client.call("containerd.task.v2.Task", "Shutdown", task.ShutdownRequest(id="c1"), Empty)
        finally:
            await client.close()
        return connected.shim_pid, *state_error

    shim_pid, code, message = asyncio.run(talk())
    assert (code, message) == (Code.NOT_FOUND.name, "no container 'c1' in this shim")
    deadline = time.monotonic() + 30
    while (socket_path.exists() or running(shim_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not socket_path.exists()
    assert not running(shim_pid)


def running(pid: int) -> bool:
    """Whether pid is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_delete_prints_a_delete_response(tmp_path: Path) -> None:
    bundle, env = make_bundle(tmp_path)
    (bundle / "address").write_text("unix:///nowhere")
    result = shim("-namespace", "unit", "-id", "c1", "-address", "/x", "delete", bundle=bundle, env=env)
    assert result.returncode == 0, result.stderr
    response = task.DeleteResponse.FromString(result.stdout)
    assert response.exit_status == 137
    assert response.exited_at.seconds > 0
    assert not (bundle / "address").exists()


def test_delete_after_the_shim_recorded_its_vm_gone_asks_no_spinboxd(tmp_path: Path) -> None:
    # The bus is unreachable: asking spinboxd would fail and say so.
    bundle, env = make_bundle(tmp_path)
    (bundle / "address").write_text("unix:///nowhere")
    (bundle / released.NAME).touch()
    result = shim("-namespace", "unit", "-id", "c1", "-address", "/x", "delete", bundle=bundle, env=env)
    assert result.returncode == 0 and result.stderr == b""
    assert task.DeleteResponse.FromString(result.stdout).exited_at.seconds > 0
    assert not (bundle / "address").exists() and not (bundle / released.NAME).exists()
    # Without the record `delete` asks spinboxd, which it cannot reach here.
    result = shim("-namespace", "unit", "-id", "c1", "-address", "/x", "delete", bundle=bundle, env=env)
    assert b"the system bus is not reachable" in result.stderr


def test_version_and_bad_usage(tmp_path: Path) -> None:
    assert b"io.containerd.spinbox.v1" in shim("-v", bundle=tmp_path, env={}).stdout
    usage = shim("--help", bundle=tmp_path, env={})
    assert usage.returncode == 0 and b"io.spinbox.memory-mib" in usage.stdout
    bad = shim("-frobnicate", bundle=tmp_path, env={})
    assert bad.returncode == 2
    assert b"unknown flag -frobnicate" in bad.stderr


def test_start_runs_its_server_from_where_spinbox_is_without_pythonpath(
    tmp_path: Path, socket_dir: str
) -> None:
    # As packaged: a wrapper puts spinbox's private module directory on its own
    # sys.path only; containerd's environment has no PYTHONPATH.
    wrapper = tmp_path / "containerd-shim-spinbox-v1"
    wrapper.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(TOP)!r})\n"
        "from spinbox.shim.__main__ import main\nsys.exit(main())\n"
    )
    wrapper.chmod(0o755)
    bundle, env = make_bundle(tmp_path, socket_dir)
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = ("-namespace", "unit", "-id", "c2", "-address", str(tmp_path / "containerd.sock"), "start")
    result = subprocess.run(
        [str(wrapper), *args],
        cwd=bundle,
        env={**environ, **env, "MAX_SHIM_VERSION": "3"},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    socket_path = Path(json.loads(result.stdout)["address"].removeprefix("unix://"))

    async def talk() -> int:
        client = await Client.connect_unix(str(socket_path))
        try:
            connected = await client.call(
                "containerd.task.v3.Task", "Connect", task.ConnectRequest(id="c2"), task.ConnectResponse
            )
            await client.call("containerd.task.v3.Task", "Shutdown", task.ShutdownRequest(id="c2"), Empty)
        finally:
            await client.close()
        return connected.shim_pid

    shim_pid = asyncio.run(talk())
    deadline = time.monotonic() + 30
    while running(shim_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(shim_pid)
