"""Resizing a running VM under TCG: vCPUs by CPU hotplug, memory by virtio-mem, seen by the guest."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from spinbox.agent import AgentClient
from spinbox.vm import VmSpec, default_kernel, launch, template
from spinbox.vm.resize import GuestView, SizeOutOfRange, VmSize, current_size, resize, size_range
from tests.harness.guestlog import GuestLogs

BOOT_TIMEOUT = 180.0
MIB_KIB = 1024


async def guest_view(address: str, vcpus: int) -> tuple[int, int]:
    agent = await AgentClient.connect(address)
    try:
        reply = await agent.online_resources(vcpus)
    finally:
        await agent.close()
    return reply.online_cpus, reply.mem_total_kib


def test_vm_grows_and_shrinks_and_refuses_what_it_cannot_be(
    guest_image: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    spec = VmSpec(
        vm_id="resize1",
        kernel=default_kernel(),
        initrd=guest_image,
        runtime_dir=tmp_path / "vm",
        accel="tcg",
        vcpus=1,
        memory_mib=256,
        max_vcpus=3,
        max_memory_mib=1024,
    )

    async def scenario() -> None:
        vm = await launch(spec)
        logs = await GuestLogs.follow(vm, tmp_path / "guest")
        try:
            await vm.wait_ready(BOOT_TIMEOUT)
            limits = await size_range(vm)
            assert limits.boot == VmSize(1, 256)
            assert limits.max == VmSize(3, 1024)
            cpus, boot_total = await guest_view(vm.control_address, 1)
            assert cpus == 1

            started = time.monotonic()
            # Resize returns once the guest's kernel counts the new size: read right after, the
            # guest's /proc/meminfo has it.
            grown = await resize(vm, VmSize(3, 768))
            cpus, total = await guest_view(vm.control_address, 3)
            print(f"grow to 3 vCPUs and 768 MiB: {time.monotonic() - started:.2f} s")
            assert grown.size == VmSize(3, 768)
            assert grown.guest == GuestView(cpus, total)
            assert cpus == 3
            assert total - boot_total == 512 * MIB_KIB

            for bad in (VmSize(4, 768), VmSize(3, 2048), VmSize(3, 128), VmSize(0, 768)):
                with pytest.raises(SizeOutOfRange):
                    await resize(vm, bad)
            assert await current_size(vm) == VmSize(3, 768)

            started = time.monotonic()
            # Memory goes back; the vCPUs stay plugged (never unplugged: the scope holds the CPU time).
            shrunk = await resize(vm, VmSize(1, 256))
            cpus, total = await guest_view(vm.control_address, 3)
            print(f"shrink to 1 vCPU and 256 MiB: {time.monotonic() - started:.2f} s")
            assert shrunk.size == VmSize(3, 256)
            assert shrunk.guest == GuestView(cpus, total)
            assert (cpus, total) == (3, boot_total)
        except BaseException as error:
            error.add_note(await logs.keep(request.node.nodeid))
            raise
        finally:
            await logs.stop()
            await vm.kill()

    asyncio.run(scenario())


def test_a_vm_restored_from_a_template_resizes_too(
    guest_image: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # The template's RAM lives on tmpfs, as spinboxd keeps it (/run/spinbox/templates).
    shm = Path(tempfile.mkdtemp(prefix="spinbox-test-resize-", dir="/dev/shm"))
    files = template.TemplateFiles(shm / "t")
    shape = {"vcpus": 1, "memory_mib": 256, "max_vcpus": 2, "max_memory_mib": 768, "accel": "tcg"}
    saved = VmSpec(
        vm_id="resize-tmpl", kernel=default_kernel(), initrd=guest_image, runtime_dir=tmp_path / "t", **shape
    )  # type: ignore[arg-type]
    restored = VmSpec(**{**saved.__dict__, "vm_id": "resize-restored", "runtime_dir": tmp_path / "r"})

    async def scenario() -> None:
        await template.build(saved, files, None, BOOT_TIMEOUT)
        ram = await asyncio.to_thread(template.load_ram, files)
        try:
            vm = await template.restore(restored, files, ram, None)
        finally:
            os.close(ram)  # the restored QEMU holds its own copy
        logs = await GuestLogs.follow(vm, tmp_path / "guest")
        try:
            _, boot_total = await guest_view(vm.control_address, 1)
            resized = await resize(vm, VmSize(2, 512))
            cpus, total = await guest_view(vm.control_address, 2)
            assert resized.size == VmSize(2, 512)
            assert resized.guest == GuestView(cpus, total)
            assert (cpus, total - boot_total) == (2, 256 * MIB_KIB)
        except BaseException as error:
            error.add_note(await logs.keep(request.node.nodeid))
            raise
        finally:
            await logs.stop()
            await vm.kill()

    try:
        asyncio.run(scenario())
    finally:
        shutil.rmtree(shm, ignore_errors=True)
