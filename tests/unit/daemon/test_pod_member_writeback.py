"""A pod member's rootfs removed as its VM's QEMU dies: its layer is written back (by a helper VM)
before its image is dropped, and a layer that cannot be is kept and named (failure paths with
fakes; tests/e2e/test_faults.py shows it through crictl with a real QEMU killed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Any

import pytest

from spinbox.config import Config
from spinbox.daemon import pod
from spinbox.daemon.errors import Failed
from spinbox.daemon.manager import Vm, VmManager
from spinbox.daemon.state import VmState
from spinbox.vm.ending import Ending


class FakeRootfs:
    def __init__(self, name: str, log: list[str], image: Path) -> None:
        self.name = name
        self.log = log
        self.writable = True
        self.upper_image = image

    async def writeback(self, stream: AsyncIterable[bytes]) -> None:
        raise AssertionError("not called by these tests")

    async def release(self) -> None:
        self.log.append(f"drop {self.name}")


class FakeMachine:
    """A QEMU that dies when the test says (`die`)."""

    def __init__(self) -> None:
        self.ending: Ending | None = None
        self.exited = asyncio.Event()

    def die(self) -> None:
        self.ending = Ending(-9)
        self.exited.set()

    async def wait_exit(self) -> None:
        await self.exited.wait()

    async def remove_disk(self, serial: str) -> None:
        if self.ending is not None:
            raise ConnectionResetError("QMP: connection lost")


class FakeBackend:
    def __init__(self, machine: FakeMachine, log: list[str]) -> None:
        self.machine = machine
        self.log = log
        self.unmounting = asyncio.Event()
        self.unmounted = asyncio.Event()
        self.unmounted.set()
        # Whether the guest's answer to the unmount came before QEMU died.
        self.unmount_answered = False

    async def export_upper(self, machine: Any, container_id: str, rootfs: Any, final: bool = False) -> None:
        if self.machine.ending is not None or self.machine.exited.is_set():
            raise ConnectionRefusedError("the agent's socket is gone")
        self.log.append(f"guest sent {container_id}")

    async def quiesce_guest(self, machine: Any, container_id: str, unmount: bool) -> None:
        self.unmounting.set()
        await self.unmounted.wait()
        if self.machine.ending is not None and not self.unmount_answered:
            raise ConnectionRefusedError("the agent's socket is gone")
        self.log.append(f"unmounted {container_id}")

    async def teardown_network(self, vm_id: str) -> None:
        pass


class FakeSystemd:
    async def stop_unit(self, unit: str) -> None:
        pass

    async def wait_gone(self, unit: str) -> None:
        pass


class FakeForwarder:
    async def stop(self, drain: float = 0) -> None:
        pass


class Pod:
    """A pod VM (sandbox s1, member m1) with a storage directory, and what happened to it."""

    def __init__(self, tmp_path: Path, helper_fails: bool = False) -> None:
        self.log: list[str] = []
        self.machine = FakeMachine()
        self.backend = FakeBackend(self.machine, self.log)
        self.manager = VmManager(Config(), FakeSystemd(), self.backend, tmp_path / "run")  # type: ignore[arg-type]

        async def helper(vm_id: str, container_id: str, rootfs: Any) -> None:
            if helper_fails:
                raise RuntimeError(f"the helper VM could not read {rootfs.upper_image}")
            self.log.append(f"helper {container_id}")

        self.manager._write_back_with_helper = helper  # type: ignore[method-assign]
        self.storage = tmp_path / "vms" / "pod1"
        self.image = self.storage / "rootfs-m1" / "upper.ext4"
        self.image.parent.mkdir(parents=True)
        self.image.write_text("the member's writes")
        state = VmState(
            id="pod1",
            phase="running",
            scope="spinbox-vm-pod1.scope",
            container_id="s1",
            storage_dir=str(self.storage),
            added_rootfs={"m1": {"prefix": "sb1", "serials": ["sb1-up"], "path": "/run/m1"}},
        )
        runtime_dir = tmp_path / "run" / "vm" / "pod1"
        runtime_dir.mkdir(parents=True)
        sandbox = FakeRootfs("s1", self.log, self.storage / "rootfs-s1" / "upper.ext4")
        self.vm = Vm(state, runtime_dir, self.machine, sandbox, FakeForwarder())  # type: ignore[arg-type]
        self.vm.added["m1"] = FakeRootfs("m1", self.log, self.image)  # type: ignore[assignment]

    async def watch_exit(self) -> None:
        """What the manager does when QEMU ends: release the VM, then settle `finished`."""
        self.vm.finished = asyncio.get_running_loop().create_future()
        await self.machine.wait_exit()
        try:
            await self.manager._release(self.vm)
        except Exception as e:
            self.vm.finished.set_exception(e)
        else:
            self.vm.finished.set_result(None)
        self.vm.finished.exception()  # looked at: its failure is the RemoveRootfs's to report


def test_a_member_removed_after_qemu_died_is_written_back_by_a_helper_before_its_image_goes(
    tmp_path: Path,
) -> None:
    pod1 = Pod(tmp_path)

    async def run() -> None:
        watcher = asyncio.create_task(pod1.watch_exit())
        await asyncio.sleep(0)
        pod1.machine.exited.set()  # QEMU died; the manager has not seen it yet
        await pod.remove_rootfs(pod1.manager, pod1.vm, "m1")
        await watcher

    asyncio.run(run())
    assert pod1.log.index("helper m1") < pod1.log.index("drop m1"), pod1.log
    assert "m1" in pod1.vm.saved
    assert not pod1.storage.exists()


def test_a_member_whose_writeback_fails_keeps_its_image_and_names_it_in_the_error(tmp_path: Path) -> None:
    pod1 = Pod(tmp_path, helper_fails=True)

    async def run() -> None:
        watcher = asyncio.create_task(pod1.watch_exit())
        await asyncio.sleep(0)
        pod1.machine.die()
        with pytest.raises(Failed) as failed:
            await pod.remove_rootfs(pod1.manager, pod1.vm, "m1")
        await watcher
        message = str(failed.value)
        assert "the writable layer of container 'm1' could not be written back" in message
        assert f"could not read {pod1.image}" in message
        assert (
            f"its disk image {pod1.image} and the VM's storage directory {pod1.storage} are kept" in message
        )

    asyncio.run(run())
    assert "drop m1" not in pod1.log
    assert pod1.image.read_text() == "the member's writes"
    assert any(str(pod1.storage) in sentence and "m1" in sentence for sentence in pod1.manager.kept.listed())


@pytest.mark.parametrize("answered", [False, True], ids=["unmount-lost", "unmount-answered"])
def test_a_removal_under_way_as_qemu_dies_ends_before_the_release_reads_the_rootfses(
    tmp_path: Path, answered: bool
) -> None:
    pod1 = Pod(tmp_path)
    pod1.backend.unmount_answered = answered

    async def run() -> None:
        watcher = asyncio.create_task(pod1.watch_exit())
        pod1.backend.unmounted.clear()
        removal = asyncio.create_task(pod.remove_rootfs(pod1.manager, pod1.vm, "m1"))
        await pod1.backend.unmounting.wait()
        # The guest sent the layer and is unmounting it when QEMU dies; the release waits.
        pod1.machine.die()
        await asyncio.sleep(0)
        pod1.backend.unmounted.set()
        await removal
        await watcher
        assert pod1.vm.finished is not None and pod1.vm.finished.exception() is None

    asyncio.run(run())
    assert pod1.log[0] == "guest sent m1"
    assert pod1.log.count("drop m1") == 1
    if answered:
        # Sent and unmounted: the removal dropped it, and the release never looked for its image.
        assert "helper m1" not in pod1.log
    else:
        # Not known to be unmounted: the helper reads it once more before the image goes.
        assert pod1.log.index("helper m1") < pod1.log.index("drop m1"), pod1.log


def test_a_guest_that_cannot_be_reached_in_a_live_vm_keeps_the_member_attached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pod, "QEMU_END_GRACE", 0.01)
    pod1 = Pod(tmp_path)

    async def unreachable(machine: Any, container_id: str, rootfs: Any, final: bool = False) -> None:
        raise TimeoutError("the agent did not answer within 30 s")

    pod1.backend.export_upper = unreachable  # type: ignore[method-assign]
    with pytest.raises(Failed, match="the rootfs stays in the VM, whose stop writes it back"):
        asyncio.run(pod.remove_rootfs(pod1.manager, pod1.vm, "m1"))
    assert "m1" in pod1.vm.added and "m1" not in pod1.vm.unwritten
    assert "drop m1" not in pod1.log
