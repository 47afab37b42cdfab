"""A VM scope's memory events: the OOM killer's kill at the scope's MemoryMax is told
from someone's SIGKILL, even when systemd removed the scope's cgroup before spinboxd
saw QEMU's exit. A directory with a memory.events file the test rewrites stands for
the cgroup (this machine's cgroup2 has no memory controller), watched by a real
inotify; spinboxd's path from QEMU's exit to its journal line and VMEndingCause's
answer runs with a stand-in QEMU."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from spinbox import cgroups
from spinbox.cgroups import Cgroup2Mount
from spinbox.config import Config
from spinbox.daemon import scopememory
from spinbox.daemon.manager import Vm, VmManager
from spinbox.daemon.scopememory import MemoryEvents, ScopeMemoryWatch, scope_ending
from spinbox.daemon.state import VmState
from spinbox.vm.ending import Ending

EVENTS = "low 0\nhigh 0\nmax {max}\noom {oom}\noom_kill {kill}\noom_group_kill {group}\n"
LIMIT = 805306368  # 512 + 256 MiB: a default VM's MemoryMax
SAID = (
    "the VM's scope reached its memory limit (MemoryMax=805306368 bytes) "
    "and the kernel's OOM killer ended QEMU (SIGKILL)"
)


def write_events(cgroup: Path, max: int = 0, oom: int = 0, kill: int = 0, group: int = 0) -> None:
    (cgroup / "memory.events").write_text(EVENTS.format(max=max, oom=oom, kill=kill, group=group))


def make_cgroup(tmp_path: Path, limit: int = LIMIT) -> Path:
    cgroup = tmp_path / "spinbox.slice" / "spinbox-vm-v1.scope"
    cgroup.mkdir(parents=True)
    write_events(cgroup, max=3)
    (cgroup / "memory.max").write_text(f"{limit}\n")
    return cgroup


async def until(what: str, predicate: Any, timeout: float = 5) -> None:  # noqa: ASYNC109
    """Until the watch, which reads the file when inotify says it changed, has read `what`."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - the kernel's notification has no awaitable
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"the watch did not read {what} within {timeout:g}s") from None


def test_memory_events_are_parsed_as_the_kernel_writes_them() -> None:
    assert MemoryEvents.parse(EVENTS.format(max=7, oom=2, kill=1, group=0)) == MemoryEvents(2, 1, 0)
    # Kernels before oom_group_kill, and stray lines, leave the others.
    assert MemoryEvents.parse("max 4\noom 1\noom_kill 1\nbogus x\n") == MemoryEvents(1, 1, 0)


def test_a_kill_seen_at_its_notification_stands_after_the_cgroup_is_removed(tmp_path: Path) -> None:
    cgroup = make_cgroup(tmp_path)

    async def run() -> tuple[str, ScopeMemoryWatch]:
        watch = ScopeMemoryWatch.start("v1", cgroup)
        assert watch is not None and watch.limit == LIMIT
        # The kernel counts the kill (inotify IN_MODIFY); systemd removes the empty scope's cgroup.
        write_events(cgroup, max=9, oom=1, kill=1)
        await until("the kill", lambda: watch.last.oom_kill == 1)
        shutil.rmtree(cgroup)
        return watch.oom_kill(), watch

    killed, watch = asyncio.run(run())
    assert killed == "limit" and watch.gone


def test_the_read_at_qemus_exit_sees_a_kill_not_yet_notified(tmp_path: Path) -> None:
    cgroup = make_cgroup(tmp_path)

    async def run() -> str:
        watch = ScopeMemoryWatch.start("v1", cgroup)
        assert watch is not None
        write_events(cgroup, max=9, oom=1, group=1)  # the whole cgroup killed (memory.oom.group)
        return watch.oom_kill()  # before the loop ran the notification's read

    assert asyncio.run(run()) == "limit"


def test_an_oom_notified_before_the_cgroup_went_counts_as_the_kill(tmp_path: Path) -> None:
    """The kill's own notification may come 10 ms after the "oom" one (the kernel's rate limit):
    with the cgroup gone by then, the OOM killer having run in it is what spinboxd last saw."""
    cgroup = make_cgroup(tmp_path)

    async def run() -> str:
        watch = ScopeMemoryWatch.start("v1", cgroup)
        assert watch is not None
        write_events(cgroup, max=9, oom=1)
        await until("the oom", lambda: watch.last.oom == 1)
        shutil.rmtree(cgroup)
        return watch.oom_kill()

    assert asyncio.run(run()) == "limit"


def test_a_kill_without_the_scope_at_its_limit_is_the_hosts_out_of_memory(tmp_path: Path) -> None:
    """The kernel counts an OOM kill in the victim's cgroup whatever ran out of memory; the
    scope's "oom" count grows only at its own limit."""
    cgroup = make_cgroup(tmp_path)

    async def run() -> Ending:
        watch = ScopeMemoryWatch.start("v1", cgroup)
        assert watch is not None
        write_events(cgroup, max=2, kill=1)
        await until("the kill", lambda: watch.last.oom_kill == 1)
        shutil.rmtree(cgroup)
        return scope_ending(Ending(-9), watch, LIMIT)

    ending = asyncio.run(run())
    assert ending == Ending(-9, oom_limit=LIMIT, oom_at_limit=False)
    assert ending.cause == "oom-kill" and ending.container_status == 137
    assert ending.reason == (
        "the kernel's OOM killer ended QEMU (SIGKILL) below the memory limit of the VM's scope "
        f"(MemoryMax={LIMIT} bytes): the host, or a slice holding the scope, ran out of memory"
    )


def test_reclaim_at_the_limit_or_an_oom_without_a_kill_is_no_oom_kill(tmp_path: Path) -> None:
    cgroup = make_cgroup(tmp_path)

    async def run() -> tuple[str, str]:
        watch = ScopeMemoryWatch.start("v1", cgroup)
        assert watch is not None
        write_events(cgroup, max=500)  # charges over the limit, all reclaimed
        first = watch.oom_kill()
        # An OOM that killed nothing, read at exit from a cgroup still there: someone else's SIGKILL.
        other = make_cgroup(tmp_path / "other")
        watch2 = ScopeMemoryWatch.start("v2", other)
        assert watch2 is not None
        write_events(other, max=9, oom=1)
        return first, watch2.oom_kill()

    assert asyncio.run(run()) == ("", "")


def test_a_cgroup_without_memory_events_has_no_watch(tmp_path: Path) -> None:
    async def run() -> ScopeMemoryWatch | None:
        return ScopeMemoryWatch.start("v1", tmp_path)  # cgroup2 without the memory controller

    assert asyncio.run(run()) is None
    assert scope_ending(Ending(-9), None, LIMIT) == Ending(-9)


def test_only_a_sigkill_spinbox_did_not_send_after_an_oom_kill_is_the_limits(tmp_path: Path) -> None:
    cgroup = make_cgroup(tmp_path)

    async def run() -> list[Ending]:
        endings = []
        for ending in (
            Ending(-9),
            Ending(-9, requested="stop"),  # the limit reached while the guest shut down
            Ending(-9, requested="kill"),
            Ending(-15),
            Ending(1, panicked=True),
        ):
            watch = ScopeMemoryWatch.start("v1", cgroup)
            assert watch is not None
            write_events(cgroup, max=9, oom=1, kill=1)
            endings.append(scope_ending(ending, watch, 1))
            write_events(cgroup, max=3)
        return endings

    oom, stopping, requested, term, panic = asyncio.run(run())
    # The limit named is the scope's own memory.max, not the one spinboxd was given (1).
    assert oom == stopping == Ending(-9, oom_limit=LIMIT)
    assert oom.reason == SAID and oom.container_status == 137 and oom.cause == "oom-kill"
    assert requested == Ending(-9, requested="kill") and requested.cause == "requested"
    assert term == Ending(-15) and term.cause == "signal"
    assert panic.cause == "panic"


def test_a_kill_that_left_qemu_running_was_another_process_s_and_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The OOM killer chose the VM's virtiofsd: QEMU runs on, and its SIGKILL later is someone's."""
    monkeypatch.setattr(scopememory, "SETTLE", 0.1)
    cgroup = make_cgroup(tmp_path)

    async def run() -> str:
        watch = ScopeMemoryWatch.start("v1", cgroup)
        assert watch is not None
        write_events(cgroup, max=9, oom=1, kill=1)
        await until("the kill", lambda: watch.baseline.oom_kill == 1, timeout=5)
        shutil.rmtree(cgroup)
        return watch.oom_kill()

    with caplog.at_level(logging.INFO):
        assert asyncio.run(run()) == ""
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line == (
        "VM v1: the kernel's OOM killer killed a process in its scope, not QEMU (the scope reached "
        f"its memory limit, MemoryMax={LIMIT} bytes); the VM runs on without it"
    )


def test_a_limit_lowered_by_hand_is_the_one_named(tmp_path: Path) -> None:
    cgroup = make_cgroup(tmp_path)

    async def run() -> Ending:
        watch = ScopeMemoryWatch.start("v1", cgroup)
        assert watch is not None
        (cgroup / "memory.max").write_text("33554432\n")  # systemctl set-property MemoryMax=32M
        write_events(cgroup, max=9, oom=1, kill=1)
        await until("the kill", lambda: watch.last.oom_kill == 1)
        shutil.rmtree(cgroup)
        return scope_ending(Ending(-9), watch, LIMIT)

    assert "(MemoryMax=33554432 bytes)" in asyncio.run(run()).reason


class FakeMachine:
    pid = 4242
    console_socket = None
    log_socket = None

    def __init__(self) -> None:
        self.ending: Ending | None = None
        self.ended = asyncio.Event()

    async def wait_exit(self) -> None:
        await self.ended.wait()

    def die(self, ending: Ending) -> None:
        self.ending = ending
        self.ended.set()


class FakeForwarder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, int]] = []
        self.sink = self

    def __call__(self, identifier: str, message: str, priority: int) -> None:
        self.lines.append((identifier, message, priority))

    async def stop(self, drain: float = 0) -> None:
        pass


def test_spinboxd_says_the_limit_ended_the_vm_in_both_journals_and_answers_oom_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cgroup = make_cgroup(tmp_path)
    monkeypatch.setattr(
        ScopeMemoryWatch, "for_process", classmethod(lambda cls, vm_id, pid: cls.start(vm_id, cgroup))
    )
    released: list[str] = []

    async def release(manager: Any, vm: Vm) -> None:
        released.append(vm.id)

    monkeypatch.setattr(VmManager, "_release", release)
    manager = VmManager(Config(), None, None, tmp_path / "run", tmp_path / "vms")  # type: ignore[arg-type]
    state = VmState(id="v1", phase="running", scope="spinbox-vm-v1.scope", pid=4242)
    state.resources = {"memory-max": LIMIT}
    machine, forwarder = FakeMachine(), FakeForwarder()

    async def run() -> tuple[Ending, Ending]:
        vm = Vm(state, tmp_path, machine, None, forwarder)  # type: ignore[arg-type]
        manager._adopt(vm)
        asking = asyncio.create_task(manager.ending("v1", 5))  # the shim's VMEndingCause
        await asyncio.sleep(0)
        write_events(cgroup, max=9, oom=1, kill=1)
        await until("the kill", lambda: vm.memory is not None and vm.memory.last.oom_kill == 1)
        shutil.rmtree(cgroup)  # systemd was first to see the scope empty
        machine.die(Ending(-9))
        assert vm.finished is not None
        await vm.finished
        return await asking, await manager.ending("v1", 0)

    with caplog.at_level(logging.INFO):
        asked, remembered = asyncio.run(run())
    assert asked == remembered == Ending(-9, oom_limit=LIMIT)
    said = f"VM v1: {SAID} (QEMU pid 4242); the processes in it end with exit status 137"
    assert forwarder.lines == [("spinboxd", said, 4)]  # the VM's own journal
    assert said in caplog.text  # spinboxd's
    assert released == ["v1"]


def test_start_up_says_once_that_limits_are_not_enforced_without_the_memory_controller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cgroup"
    (root / "system.slice" / "spinbox.service").mkdir(parents=True)  # spinboxd's own cgroup
    monkeypatch.setattr(scopememory, "cgroup2_mounts", lambda: [Cgroup2Mount(root, "/")])
    monkeypatch.setattr(
        scopememory, "cgroup_of", lambda pid, mounts: root / "system.slice" / "spinbox.service"
    )
    monkeypatch.setattr(scopememory, "v1_mount", lambda controller: None)
    (root / "cgroup.controllers").write_text("hugetlb\n")
    with caplog.at_level(logging.INFO):
        assert not scopememory.say_if_not_enforced()
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line == (
        f"cgroup2 offers no memory controller here (cgroup.controllers of {root}: hugetlb): each VM "
        "scope's MemoryMax is recorded but not enforced, and no VM's end can be told to be its "
        "memory limit's"
    )
    caplog.clear()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    with caplog.at_level(logging.INFO):
        assert scopememory.say_if_not_enforced()
    assert not caplog.records


def test_start_up_says_where_a_cgroup_v1_memory_controller_enforces_what_is_not_watched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A hybrid host (this one): systemd applies MemoryMax as v1's memory.limit_in_bytes."""
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "25 1 0:23 / /sys/fs/cgroup/memory rw,nosuid shared:9 - cgroup cgroup rw,memory\n"
        "26 1 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n"
    )
    assert cgroups.v1_mount("memory", mountinfo) == Path("/sys/fs/cgroup/memory")
    assert cgroups.v1_mount("pids", mountinfo) is None
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text("\n")
    monkeypatch.setattr(scopememory, "cgroup2_mounts", lambda: [Cgroup2Mount(root, "/")])
    monkeypatch.setattr(scopememory, "cgroup_of", lambda pid, mounts: root)
    monkeypatch.setattr(scopememory, "v1_mount", lambda controller: cgroups.v1_mount(controller, mountinfo))
    with caplog.at_level(logging.INFO):
        assert not scopememory.say_if_not_enforced()
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line == (
        f"cgroup2 offers no memory controller here (cgroup.controllers of {root}: none); it is "
        "cgroup v1's (/sys/fs/cgroup/memory), where systemd enforces each VM scope's MemoryMax, "
        "but spinboxd watches only cgroup2's memory events: a VM that limit ends is said to be "
        "killed by SIGKILL, with no TaskOOM"
    )
