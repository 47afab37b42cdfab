"""Booting QEMU VMs under TCG and driving them: console, QMP, re-adoption, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest

from spinbox.vm import VirtualMachine, VmError, VmSpec, default_kernel, launch
from tests.harness.initimage import build_init_image

# PID 1 of the test image: says hello on the console, then powers off or idles,
# as the kernel command line's `spinboxtest=` (init's environment) says.
TEST_INIT = """
import os
import time


def main() -> None:
    print("spinbox-test-init: hello from PID", os.getpid(), flush=True)
    if os.environ.get("spinboxtest") == "poweroff":
        os.execv("/bin/busybox", ["poweroff", "-f"])
    if os.environ.get("spinboxtest") == "panic":
        modules = open("/etc/spinbox/modules").read().split()
        for module in [m for m in modules if "pvpanic" in m]:
            os.spawnv(os.P_WAIT, "/bin/busybox", ["insmod", module])
        return
    while True:
        time.sleep(3600)
"""

BOOT_TIMEOUT = 180.0  # generous: TCG on a loaded 2-core machine


@pytest.fixture(scope="module")
def test_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_init_image(tmp_path_factory.mktemp("testinit"), "spinboxtestinit", TEST_INIT)


def make_spec(image: Path, runtime_dir: Path, **changes: Any) -> VmSpec:
    spec = VmSpec(vm_id="t1", kernel=default_kernel(), initrd=image, runtime_dir=runtime_dir, accel="tcg")
    return VmSpec(**{**spec.__dict__, **changes})


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro())


def assert_gone(pid: int, runtime_dir: Path) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    leftovers = list(runtime_dir.iterdir()) if runtime_dir.exists() else []
    assert leftovers == []


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        chunk = await asyncio.wait_for(reader.read(4096), BOOT_TIMEOUT)
        assert chunk, f"console closed before {marker!r}; it said: {seen.decode(errors='replace')}"
        seen += chunk
    return seen


def test_console_qmp_and_shutdown(test_image: Path, tmp_path: Path) -> None:
    runtime_dir = tmp_path / "vm"

    async def scenario() -> None:
        vm = await launch(make_spec(test_image, runtime_dir), start=False)
        try:
            assert vm.accel == "tcg"
            assert await vm.status() == "prelaunch"
            reader, writer = await asyncio.open_unix_connection(str(vm.console_socket))
            await vm.resume()
            await read_until(reader, b"spinbox-test-init: hello from PID 1")  # the console reached init
            assert await vm.status() == "running"
            with pytest.raises(VmError, match="agent did not answer within 1 s"):
                await vm.wait_ready(1)  # this init has no agent

            events = vm.events()
            await vm.pause()
            assert await vm.status() == "paused"
            assert (await asyncio.wait_for(anext(events), 30))["event"] == "STOP"
            await vm.resume()
            assert await vm.status() == "running"
            assert (await asyncio.wait_for(anext(events), 30))["event"] == "RESUME"
            assert set(vm.timeline) >= {"exec", "qmp-up"}
            status = await vm.shutdown(30)
            assert status == 0  # QMP quit
            await asyncio.wait_for(reader.read(), 30)  # to EOF: QEMU closed the console
            writer.close()
        finally:
            await vm.kill()
        assert_gone(vm.pid, runtime_dir)

    run(scenario)


def test_guest_poweroff_ends_the_vm(test_image: Path, tmp_path: Path) -> None:
    runtime_dir = tmp_path / "vm"

    async def scenario() -> None:
        vm = await launch(make_spec(test_image, runtime_dir, kernel_args=("spinboxtest=poweroff",)))
        try:
            events = vm.events()
            assert await asyncio.wait_for(vm.wait_exit(), BOOT_TIMEOUT) == 0
            assert (await asyncio.wait_for(anext(events), 5))["event"] == "SHUTDOWN"
            with pytest.raises(VmError, match="is not running"):
                await vm.status()
        finally:
            await vm.kill()
        assert_gone(vm.pid, runtime_dir)

    run(scenario)


def test_attach_re_adopts_a_running_vm(test_image: Path, tmp_path: Path) -> None:
    runtime_dir = tmp_path / "vm"

    async def scenario() -> None:
        first = await launch(make_spec(test_image, runtime_dir), start=False)
        try:
            await first.detach()  # as spinboxd does when it exits for a restart
            vm = await VirtualMachine.attach(runtime_dir)
            assert vm.pid == first.pid
            assert vm.control_address == first.control_address
            assert await vm.status() == "prelaunch"
            assert vm.timeline["qmp-up"] > 0
            assert await vm.kill() in (None, -9)  # None when its parent (this loop) reaped it first
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(first.pid, signal.SIGKILL)
        with pytest.raises(VmError, match="no VM state"):
            await VirtualMachine.attach(runtime_dir)

    run(scenario)


def test_missing_kernel_or_image_is_a_sentence(test_image: Path, tmp_path: Path) -> None:
    runtime_dir = tmp_path / "vm"

    async def scenario() -> None:
        missing_kernel = make_spec(test_image, runtime_dir, kernel=tmp_path / "vmlinuz-none")
        with pytest.raises(
            VmError, match=r"guest kernel .*vmlinuz-none does not exist: install Debian's cloud"
        ):
            await launch(missing_kernel)
        missing_image = make_spec(tmp_path / "initrd.img", runtime_dir)
        with pytest.raises(VmError, match=r"build it with `spinbox-mkguest --output .*initrd.img`"):
            await launch(missing_image)
        assert not runtime_dir.exists()

    run(scenario)


def test_qemu_refusing_to_start_is_reported(test_image: Path, tmp_path: Path) -> None:
    runtime_dir = tmp_path / "vm"

    async def scenario() -> None:
        spec = make_spec(test_image, runtime_dir, extra_args=("-device", "no-such-device"))
        with pytest.raises(VmError, match=r"failed to start .*no-such-device"):
            await launch(spec)
        assert not runtime_dir.exists()

    run(scenario)


def test_guest_image_boots_to_agent_ready(guest_image: Path, tmp_path: Path) -> None:
    """The real image: vminitd answers Ping on both channels and Shutdown, and QEMU then quits."""
    from spinbox.agent import AgentClient

    runtime_dir = tmp_path / "vm"

    async def scenario() -> None:
        vm = await launch(make_spec(guest_image, runtime_dir))
        try:
            timeline = await vm.wait_ready(BOOT_TIMEOUT)
            assert timeline["exec"] == 0
            assert 0 < timeline["qmp-up"] < timeline["agent-ready"]
            assert {"guest-entry", "guest-modules", "guest-agent-listening"} <= set(timeline)
            agent = await AgentClient.connect(vm.agent_address)  # the shim's channel
            try:
                assert (await agent.ping()).timeline["agent-listening"] > 0
            finally:
                await agent.close()
            assert await vm.shutdown(60) == 0  # the agent answered Shutdown, then QMP quit
        finally:
            await vm.kill()
        assert_gone(vm.pid, runtime_dir)

    run(scenario)


def test_guest_panic_is_reported(test_image: Path, tmp_path: Path) -> None:
    runtime_dir = tmp_path / "vm"

    async def scenario() -> None:
        # The test init loads pvpanic-pci, then exits: PID 1 exiting panics the kernel.
        vm = await launch(make_spec(test_image, runtime_dir, kernel_args=("spinboxtest=panic",)))
        try:
            events = vm.events()
            assert await asyncio.wait_for(vm.wait_exit(), BOOT_TIMEOUT) == 1
            names = [event["event"] async for event in events]
            assert "GUEST_PANICKED" in names
        finally:
            await vm.kill()
        assert_gone(vm.pid, runtime_dir)

    run(scenario)


def test_a_failing_spawn_leaves_nothing(test_image: Path, tmp_path: Path) -> None:
    runtime_dir = tmp_path / "vm"

    async def refuse(argv: list[str], pass_fds: Sequence[int]) -> int:
        raise VmError(f"cannot start {argv[len(argv) - argv[::-1].index('--')]}")

    async def scenario() -> None:
        with pytest.raises(VmError, match="cannot start qemu-system-x86_64"):
            await launch(make_spec(test_image, runtime_dir), spawn=refuse)
        assert not runtime_dir.exists()

    run(scenario)
