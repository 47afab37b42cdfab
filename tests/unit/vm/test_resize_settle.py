"""A resize returns once the guest's kernel counts the machine's new size; what the guest
answers is checked against what the VM can have (the guest is not trusted)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from spinbox.api.proto import agent_pb2 as pb
from spinbox.vm import resize
from spinbox.vm.resize import GuestUnsettled, GuestView, SizeRange, VmSize

LIMITS = SizeRange(boot=VmSize(1, 256), max=VmSize(3, 1024), memory_step_mib=2)
BOOT_KIB = 222236


class FakeVm:
    vm_id = "settle1"
    control_address = "unix:/nonexistent/control.sock"

    async def query(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        raise AssertionError("settle asks the guest, not QEMU")


class FakeAgent:
    def __init__(self, answer: pb.OnlineResourcesResponse) -> None:
        self.answer = answer
        self.asked: list[tuple[int, int | None, float]] = []

    async def online_resources(
        self, vcpus: int, plugged_memory_kib: int | None = None, memory_timeout: float = 0.0
    ) -> pb.OnlineResourcesResponse:
        self.asked.append((vcpus, plugged_memory_kib, memory_timeout))
        return self.answer


def settle(
    monkeypatch: pytest.MonkeyPatch, size: VmSize, **answer: int
) -> tuple[GuestView | GuestUnsettled, FakeAgent]:
    agent = FakeAgent(pb.OnlineResourcesResponse(**answer))
    timeouts: list[float] = []

    async def session(address: str, call: Callable[[Any], Awaitable[Any]], call_timeout: float) -> Any:
        assert address == FakeVm.control_address
        timeouts.append(call_timeout)
        return await call(agent)

    monkeypatch.setattr(resize.control, "session", session)
    try:
        result: GuestView | GuestUnsettled = asyncio.run(resize.settle(FakeVm(), LIMITS, size, 7.0))
    except GuestUnsettled as error:
        result = error
    # The guest waits up to the time given; its answer has a margin beyond that.
    assert timeouts == [7.0 + resize.ANSWER_MARGIN]
    return result, agent


def test_a_guest_that_counts_the_devices_memory_is_settled(monkeypatch: pytest.MonkeyPatch) -> None:
    view, agent = settle(
        monkeypatch,
        VmSize(3, 768),
        online_cpus=3,
        mem_total_kib=BOOT_KIB + 512 * 1024,
        boot_mem_total_kib=BOOT_KIB,
    )
    assert view == GuestView(3, BOOT_KIB + 512 * 1024)
    assert agent.asked == [(3, 512 * 1024, 7.0)]


def test_a_guest_still_counting_an_unplugged_block_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    error, _ = settle(
        monkeypatch,
        VmSize(3, 256),
        online_cpus=3,
        mem_total_kib=BOOT_KIB + 128 * 1024,
        boot_mem_total_kib=BOOT_KIB,
        removing_memory_blocks=1,
    )
    assert isinstance(error, GuestUnsettled)
    assert error.size == VmSize(3, 256)
    message = str(error)
    assert "VM settle1's guest did not count the memory its virtio-mem device has plugged" in message
    assert "its kernel counts 128 MiB beyond the memory it booted with" in message
    assert "still removing 1 memory blocks" in message
    assert "the device 0 MiB (the VM has 256 MiB)" in message


def test_a_guest_missing_vcpus_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    error, _ = settle(
        monkeypatch, VmSize(3, 256), online_cpus=2, mem_total_kib=BOOT_KIB, boot_mem_total_kib=BOOT_KIB
    )
    assert isinstance(error, GuestUnsettled)
    assert "has 2 of its 3 vCPUs online" in str(error)


@pytest.mark.parametrize(
    "answer",
    [
        {
            "online_cpus": 4,
            "mem_total_kib": BOOT_KIB,
            "boot_mem_total_kib": BOOT_KIB,
        },  # more vCPUs than the VM has
        {"online_cpus": 0, "mem_total_kib": BOOT_KIB, "boot_mem_total_kib": BOOT_KIB},
        {
            "online_cpus": 1,
            "mem_total_kib": 2048 * 1024,
            "boot_mem_total_kib": BOOT_KIB,
        },  # beyond the maximum
        {"online_cpus": 1, "mem_total_kib": BOOT_KIB, "boot_mem_total_kib": 0},  # a guest that does not say
        {
            "online_cpus": 1,
            "mem_total_kib": BOOT_KIB,
            "boot_mem_total_kib": 300 * 1024,
        },  # beyond its boot memory
    ],
)
def test_an_answer_the_vm_cannot_have_is_refused(
    monkeypatch: pytest.MonkeyPatch, answer: dict[str, int]
) -> None:
    error, _ = settle(monkeypatch, VmSize(1, 256), **answer)
    assert isinstance(error, GuestUnsettled)
    assert "answered with sizes it cannot have" in str(error)
    assert error.size == VmSize(1, 256)
