"""Which writable layers spinboxd writes back how when a VM stops: the guest's stream, a helper VM, or a
named error (failure paths with fakes; the real paths are in tests/integration/daemon)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Any

import pytest

from spinbox.config import Config
from spinbox.daemon.manager import Vm, VmManager
from spinbox.daemon.qemu import ExportStalled
from spinbox.daemon.state import VmState
from spinbox.storage.upperstream import UnsafeUpper
from spinbox.ttrpc import Code, TtrpcError


class FakeRootfs:
    def __init__(self, writable: bool = True) -> None:
        self.writable = writable
        self.released = False
        self.upper_image = Path("/var/lib/spinbox/vms/vm1/rootfs-c1/upper.ext4") if writable else None

    async def writeback(self, stream: AsyncIterable[bytes]) -> None:
        raise AssertionError("not called by these tests")

    async def release(self) -> None:
        self.released = True


class FakeBackend:
    def __init__(self, export_error: BaseException | None) -> None:
        self.export_error = export_error
        self.exported: list[str] = []
        self.final = False

    async def export_upper(self, machine: Any, container_id: str, rootfs: Any, final: bool = False) -> None:
        if self.export_error is not None:
            raise self.export_error
        self.exported.append(container_id)
        self.final = final

    async def teardown_network(self, vm_id: str) -> None:
        pass


class FakeSystemd:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def stop_unit(self, unit: str) -> None:
        self.log.append(f"stop {unit}")

    async def wait_gone(self, unit: str) -> None:
        self.log.append(f"gone {unit}")


class FakeForwarder:
    async def stop(self, drain: float = 0) -> None:
        pass


def manager_and_vm(tmp_path: Path, error: BaseException | None) -> tuple[VmManager, Vm, list[str]]:
    log: list[str] = []
    backend = FakeBackend(error)
    manager = VmManager(Config(), FakeSystemd(log), backend, tmp_path)  # type: ignore[arg-type]

    async def helper(vm_id: str, container_id: str, rootfs: Any) -> None:
        log.append(f"helper {container_id}")

    manager._write_back_with_helper = helper  # type: ignore[method-assign]
    state = VmState(id="vm1", phase="stopping", scope="spinbox-vm-vm1.scope", container_id="c1")
    runtime_dir = tmp_path / "vm1"
    runtime_dir.mkdir()
    vm = Vm(state, runtime_dir, machine=None, rootfs=FakeRootfs(), forwarder=FakeForwarder())  # type: ignore[arg-type]
    vm.added["c2"] = FakeRootfs(writable=False)  # type: ignore[assignment]
    return manager, vm, log


async def stop_and_release(manager: VmManager, vm: Vm) -> None:
    for container_id, rootfs in vm.rootfses().items():
        await manager._export_at_stop(vm, container_id, rootfs)
    await manager._release(vm)


def test_a_layer_the_guest_sent_is_not_read_again(tmp_path: Path) -> None:
    manager, vm, log = manager_and_vm(tmp_path, None)
    asyncio.run(stop_and_release(manager, vm))
    assert vm.exported == {"c1"}
    # The export at a stop has the guest end the container first: nothing writes after it.
    assert manager.backend.final  # type: ignore[attr-defined]
    assert not any(entry.startswith("helper") for entry in log)
    assert all(rootfs.released for rootfs in vm.rootfses().values())  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError("the agent's connection was lost"),
        TtrpcError(Code.UNAVAILABLE, "ttrpc connection closed"),
        ExportStalled("the guest sent nothing of the writable layer for 60 s"),
    ],
)
def test_a_layer_the_guest_could_not_send_is_read_by_a_helper_vm_once_the_scope_is_gone(
    tmp_path: Path, error: BaseException
) -> None:
    manager, vm, log = manager_and_vm(tmp_path, error)
    asyncio.run(stop_and_release(manager, vm))
    assert log == ["stop spinbox-vm-vm1.scope", "gone spinbox-vm-vm1.scope", "helper c1", *log[3:]]
    assert log.count("helper c1") == 1  # the read-only rootfs c2 has nothing to write back


@pytest.mark.parametrize(
    ("error", "named"),
    [
        (UnsafeUpper("the writable layer of container c1 names the path b'../x', which escapes"), "escapes"),
        (TtrpcError(Code.FAILED_PRECONDITION, "/dev/sda is a block device node"), "device node"),
    ],
)
def test_a_refused_layer_fails_the_stop_by_name_without_a_helper(
    tmp_path: Path, error: BaseException, named: str
) -> None:
    manager, vm, log = manager_and_vm(tmp_path, error)
    with pytest.raises(Exception, match=f"writeback of container 'c1'.*{named}"):
        asyncio.run(stop_and_release(manager, vm))
    assert not any(entry.startswith("helper") for entry in log)
