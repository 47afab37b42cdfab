"""systemd's JobRemoved is taken from systemd's unique bus name only."""

from __future__ import annotations

import asyncio
from typing import Any

from dbus_fast import Message, MessageType

from spinbox.daemon.systemd import BUS_DRIVER, MANAGER_IFACE, SYSTEMD, SystemdManager

JOB = "/org/freedesktop/systemd1/job/42"


def signal(
    sender: str, member: str, signature: str, body: list[Any], interface: str = MANAGER_IFACE
) -> Message:
    return Message(
        message_type=MessageType.SIGNAL,
        sender=sender,
        path="/org/freedesktop/systemd1",
        interface=interface,
        member=member,
        signature=signature,
        body=body,
    )


def job_removed(sender: str, result: str) -> Message:
    return signal(sender, "JobRemoved", "uoss", [42, JOB, "spinbox-vm-a.scope", result])


def test_job_removed_counts_only_from_systemd() -> None:
    async def scenario() -> None:
        manager = SystemdManager(bus=None)  # type: ignore[arg-type]
        manager._systemd = ":1.1"
        waiting: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        manager._jobs[JOB] = waiting
        manager._on_message(job_removed(":1.66", "failed"))  # another connection
        manager._on_message(job_removed(SYSTEMD, "failed"))  # a well-known name is not a sender
        assert not waiting.done() and list(manager._jobs) == [JOB]
        manager._on_message(job_removed(":1.1", "done"))
        assert waiting.result() == "done"

    asyncio.run(scenario())


def finished(manager: SystemdManager) -> dict[str, str]:
    """The jobs whose end was taken, and their results."""
    return {job: future.result() for job, future in manager._jobs.items() if future.done()}


def test_early_spoofs_are_not_remembered_for_later_jobs() -> None:
    async def scenario() -> None:
        manager = SystemdManager(bus=None)  # type: ignore[arg-type]
        manager._systemd = ":1.1"
        manager._on_message(job_removed(":1.66", "failed"))
        assert finished(manager) == {}
        manager._on_message(job_removed(":1.1", "done"))
        assert finished(manager) == {JOB: "done"}

    asyncio.run(scenario())


def test_a_new_systemd_connection_is_followed_from_the_bus_itself() -> None:
    async def scenario() -> None:
        manager = SystemdManager(bus=None)  # type: ignore[arg-type]
        manager._systemd = ":1.1"
        owner_changed = ["NameOwnerChanged", "sss", [SYSTEMD, ":1.1", ":1.7"]]
        manager._on_message(signal(":1.66", *owner_changed, interface=BUS_DRIVER))  # type: ignore[arg-type]
        assert manager._systemd == ":1.1"
        manager._on_message(signal(BUS_DRIVER, *owner_changed, interface=BUS_DRIVER))  # type: ignore[arg-type]
        assert manager._systemd == ":1.7"
        manager._on_message(job_removed(":1.7", "done"))
        assert finished(manager) == {JOB: "done"}

    asyncio.run(scenario())
