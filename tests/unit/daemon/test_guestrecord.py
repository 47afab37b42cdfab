"""VM.RecordGuestState's record in the VM's journal: what it says, one at a time, bounded."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from spinbox.daemon import guestrecord
from spinbox.daemon.errors import Failed, GuestUnsettled
from spinbox.ttrpc import Code, TtrpcError
from spinbox.vm import gueststate
from tests.unit.vm.test_gueststate import INFO_REGISTERS


class FakeMachine:
    pid = 4242

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.queries = 0

    async def query(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.queries += 1
        if self.hang:
            await asyncio.sleep(3600)
        if command == "query-cpus-fast":
            return [{"cpu-index": 0, "thread-id": 11}, {"cpu-index": 1, "thread-id": 12}]
        if command == "query-status":
            return {"status": "running"}
        return INFO_REGISTERS


class FakeForwarder:
    def __init__(self, connected: bool = True) -> None:
        self.connected = connected
        self.lines: list[tuple[str, str, int]] = []
        self.console: list[bytes] = []

    def sink(self, identifier: str, message: str, priority: int) -> None:
        self.lines.append((identifier, message, priority))

    async def write_console(self, data: bytes) -> bool:
        if self.connected:
            self.console.append(data)
        return self.connected


class FakeVm:
    def __init__(
        self, phase: str = "running", machine: FakeMachine | None = None, connected: bool = True
    ) -> None:
        self.id = "vm-1"
        self.phase = phase
        self.machine = machine or FakeMachine()
        self.forwarder = FakeForwarder(connected)
        self.recording: asyncio.Task[None] | None = None

    def messages(self) -> list[str]:
        return [message for _, message, _ in self.forwarder.lines]


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gueststate, "SAMPLE", 0.01)
    monkeypatch.setattr(gueststate, "SYSRQ_PAUSE", 0.0)
    monkeypatch.setattr(gueststate, "thread_cpu_seconds", lambda pid, tid: 1.0)
    monkeypatch.setattr(gueststate, "kernel_args_of", lambda pid: ["console=ttyS0", "quiet"])
    monkeypatch.setattr(gueststate, "describe_vcpus", _quick_describe)


_describe = gueststate.describe_vcpus


async def _quick_describe(vm: Any, sample: float = 0.01) -> list[str]:
    return await _describe(vm, sample=0.01)


def test_the_record_has_each_vcpu_then_asks_the_guest_kernel() -> None:
    vm = FakeVm()
    asyncio.run(guestrecord.record_guest_state(vm, "spinbox.agent.v1.Agent/Signal: the guest did not answer"))  # type: ignore[arg-type]
    messages = vm.messages()
    assert (
        messages[0] == "recording where the guest is: spinbox.agent.v1.Agent/Signal: the guest did not answer"
    )
    assert messages[1] == "QEMU's vCPUs are running: 2 vCPUs"
    assert messages[2].startswith("vCPU 0: thread 11 used 0% of a host CPU; running in user mode")
    assert messages[3].startswith("vCPU 1: thread 12 used 0% of a host CPU; halted in kernel mode")
    assert "magic SysRq l and w" in messages[4]
    assert {identifier for identifier, _, _ in vm.forwarder.lines} == {"spinboxd"}
    # Loglevel 9 for the dumps, then back to the quiet kernel's 4.
    assert vm.forwarder.console == [b"\x01b9", b"\x01bl", b"\x01bw", b"\x01b4"]


def test_calls_while_a_record_is_made_share_it() -> None:
    vm = FakeVm()

    async def both() -> None:
        await asyncio.gather(
            guestrecord.record_guest_state(vm, "first"),  # type: ignore[arg-type]
            guestrecord.record_guest_state(vm, "second"),  # type: ignore[arg-type]
        )

    asyncio.run(both())
    assert [m for m in vm.messages() if m.startswith("recording")] == ["recording where the guest is: first"]
    assert len(vm.forwarder.console) == 4


def test_a_paused_vm_or_a_lost_console_gets_qemus_view_only() -> None:
    paused = FakeVm(phase="paused")
    asyncio.run(guestrecord.record_guest_state(paused, "asked"))  # type: ignore[arg-type]
    assert paused.messages()[-1] == "the VM is paused: its guest kernel cannot be asked for backtraces"
    assert paused.forwarder.console == []
    unplugged = FakeVm(connected=False)
    asyncio.run(guestrecord.record_guest_state(unplugged, "asked"))  # type: ignore[arg-type]
    assert unplugged.messages()[-1].startswith("the serial console is not connected")


def test_a_vm_without_a_guest_is_refused() -> None:
    with pytest.raises(Failed, match="VM 'vm-1' is stopping: there is no guest to record"):
        asyncio.run(guestrecord.record_guest_state(FakeVm(phase="stopping"), "asked"))  # type: ignore[arg-type]


def test_a_qemu_that_does_not_answer_ends_the_record_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guestrecord, "RECORD_TIMEOUT", 0.05)
    vm = FakeVm(machine=FakeMachine(hang=True))
    asyncio.run(guestrecord.record_guest_state(vm, "asked"))  # type: ignore[arg-type]
    assert vm.forwarder.lines[-1] == (
        "spinboxd",
        "the record of where the guest is did not finish within 0.05 s",
        3,
    )
    assert vm.recording is not None and vm.recording.done()


def test_spinboxds_own_missed_deadline_starts_a_record_it_does_not_wait_for() -> None:
    async def scenario() -> FakeVm:
        vm = FakeVm()
        missed = TtrpcError(
            Code.DEADLINE_EXCEEDED, "spinbox.agent.v1.Agent/OnlineResources: the guest did not answer"
        )
        guestrecord.record_if_missed(vm, TtrpcError(Code.NOT_FOUND, "no such container"))
        guestrecord.record_if_missed(vm, TimeoutError())
        assert vm.recording is None
        guestrecord.record_if_missed(vm, missed)
        first = vm.recording
        guestrecord.record_if_missed(vm, missed)  # while it is made: no second one
        assert first is not None and vm.recording is first and not first.done()
        await first
        return vm

    vm = asyncio.run(scenario())
    assert vm.messages()[0].endswith("Agent/OnlineResources: the guest did not answer")
    assert len(vm.forwarder.console) == 4


def test_a_resize_whose_guest_did_not_settle_starts_a_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gueststate, "SYSRQ_PAUSE", 0.0)
    monkeypatch.setattr(gueststate, "SAMPLE", 0.0)

    async def scenario() -> FakeVm:
        vm = FakeVm()
        unsettled = GuestUnsettled(
            "VM vm-1's guest did not count the memory its virtio-mem device has plugged within 57.0 s",
            {"vcpus": 1, "memory-mib": 256},
        )
        guestrecord.record_if_missed(vm, unsettled)  # type: ignore[arg-type]
        assert vm.recording is not None
        await vm.recording
        return vm

    vm = asyncio.run(scenario())
    assert vm.messages()[0].endswith("device has plugged within 57.0 s")
