"""systemd job tracking: every waiter on a job (systemd merges a second
StopUnit into the first one's job) sees it finish, whichever came first, the
reply or the JobRemoved signal; a job that never finishes fails its deadline
with a sentence naming the unit."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dbus_fast import Message, MessageType

from spinbox.daemon.systemd import MANAGER_IFACE, JobTimeout, SystemdManager

JOB = "/org/freedesktop/systemd1/job/42"
# systemd's unique bus name: JobRemoved counts from that sender only.
SYSTEMD_UNIQUE = ":1.1"


class FakeBus:
    """Answers StopUnit with JOB; systemd's signals are sent by the test."""

    def __init__(self, answer: bool = True) -> None:
        self.handlers: list[Any] = []
        self.answer = answer

    def add_message_handler(self, handler: Any) -> None:
        self.handlers.append(handler)

    async def call(self, message: Message) -> Message:
        if not self.answer:
            await asyncio.sleep(3600)
        return Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, signature="o", body=[JOB])

    def job_removed(self, job: str = JOB, result: str = "done") -> None:
        signal = Message(message_type=MessageType.SIGNAL, sender=SYSTEMD_UNIQUE,
                         path="/org/freedesktop/systemd1", interface=MANAGER_IFACE, member="JobRemoved",
                         signature="uoss", body=[42, job, "spinbox-vm-a.scope", result])  # fmt: skip
        assert signal.message_type == MessageType.SIGNAL
        for handler in self.handlers:
            handler(signal)


def manager(bus: FakeBus, timeout: float = 5) -> SystemdManager:
    systemd = SystemdManager(bus, job_timeout=timeout)  # type: ignore[arg-type]
    systemd._systemd = SYSTEMD_UNIQUE
    bus.add_message_handler(systemd._on_message)
    return systemd


def test_two_waiters_on_one_merged_job_both_finish() -> None:
    async def scenario() -> None:
        bus = FakeBus()
        systemd = manager(bus)
        first = asyncio.create_task(systemd.stop_unit("spinbox-vm-a.scope"))
        second = asyncio.create_task(systemd.stop_unit("spinbox-vm-a.scope"))
        await asyncio.sleep(0.01)
        bus.job_removed()
        await asyncio.wait_for(asyncio.gather(first, second), 2)

    asyncio.run(scenario())


def test_a_job_removed_before_its_reply_is_seen_by_every_waiter() -> None:
    async def scenario() -> None:
        bus = FakeBus()
        systemd = manager(bus)
        bus.job_removed()
        await asyncio.wait_for(systemd.stop_unit("spinbox-vm-a.scope"), 2)
        await asyncio.wait_for(systemd.stop_unit("spinbox-vm-a.scope"), 2)

    asyncio.run(scenario())


def test_one_waiter_giving_up_leaves_the_other_waiting() -> None:
    async def scenario() -> None:
        bus = FakeBus()
        systemd = manager(bus)
        first = asyncio.create_task(systemd.stop_unit("spinbox-vm-a.scope"))
        second = asyncio.create_task(systemd.stop_unit("spinbox-vm-a.scope"))
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.sleep(0.01)
        bus.job_removed()
        await asyncio.wait_for(second, 2)

    asyncio.run(scenario())


def test_a_job_that_never_finishes_fails_its_deadline_naming_the_unit() -> None:
    async def scenario() -> None:
        systemd = manager(FakeBus(), timeout=0.2)
        with pytest.raises(JobTimeout, match=r"cannot stop spinbox-vm-a.scope: .* within 0.2s"):
            await systemd.stop_unit("spinbox-vm-a.scope")

    asyncio.run(scenario())


def test_systemd_not_answering_a_call_fails_its_deadline_naming_the_call() -> None:
    async def scenario() -> None:
        systemd = manager(FakeBus(answer=False), timeout=0.2)
        with pytest.raises(JobTimeout, match=r"systemd did not answer StopUnit within 0.2s"):
            await systemd.stop_unit("spinbox-vm-a.scope")

    asyncio.run(scenario())


def test_finished_jobs_are_forgotten_beyond_a_bound() -> None:
    async def scenario() -> None:
        bus = FakeBus()
        systemd = manager(bus)
        for n in range(1000):
            bus.job_removed(f"/org/freedesktop/systemd1/job/{n}")
        assert len(systemd._jobs) <= 256

    asyncio.run(scenario())
