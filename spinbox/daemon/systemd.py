"""systemd's manager over D-Bus: transient scopes for VMs, and the jobs that make them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio.message_bus import MessageBus
from dbus_fast.errors import DBusError

from spinbox.daemon import dbuscall

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
SLICE = "spinbox.slice"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
# Starting or stopping a scope takes milliseconds; a job still running after
# this long is stuck (spinbox.toml's timeouts.systemd_job overrides it).
JOB_TIMEOUT = 30.0
FINISHED_KEPT = 256
# The bus itself: the sender of NameOwnerChanged, a name no client can own.
BUS_DRIVER = "org.freedesktop.DBus"
BUS_DRIVER_PATH = "/org/freedesktop/DBus"


def scope_name(vm_id: str) -> str:
    return f"spinbox-vm-{vm_id}.scope"


@dataclass(frozen=True)
class ScopeLimits:
    """The cgroup limits of one VM's scope."""

    memory_max: int  # bytes
    cpu_quota_per_sec_usec: int
    tasks_max: int

    @classmethod
    def for_vm(cls, vcpus: int, memory_mib: int, overhead_mib: int) -> ScopeLimits:
        # QEMU runs a thread per vCPU plus its main loop, RCU, I/O workers and
        # the threads of each virtio backend; 64 leaves room for bursts of them.
        return cls(
            memory_max=(memory_mib + overhead_mib) * 1024 * 1024,
            cpu_quota_per_sec_usec=vcpus * 1_000_000,
            tasks_max=64 + 8 * vcpus,
        )


class SystemdError(RuntimeError):
    pass


class JobTimeout(SystemdError):
    """A systemd job that did not finish within its deadline."""


def _body(reply: Message | None) -> Any:
    """A reply's body, or its error raised as DBusError."""
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        raise DBusError(str(reply.error_name), str(reply.body[0] if reply.body else ""))
    return reply.body


class SystemdManager:
    """Calls on org.freedesktop.systemd1.Manager, with job completion tracking."""

    def __init__(self, bus: MessageBus, job_timeout: float = JOB_TIMEOUT) -> None:
        self.bus = bus
        self.job_timeout = job_timeout
        # One future per job, shared by everyone waiting for it: systemd merges
        # a StopUnit for a unit already being stopped into the running job, so
        # two callers may hold the same job path. Finished jobs stay (up to
        # FINISHED_KEPT of them) for a waiter whose reply came after the signal.
        self._jobs: dict[str, asyncio.Future[str]] = {}
        # systemd's unique bus name: signals from any other connection are not systemd's.
        self._systemd = ""

    async def subscribe(self) -> None:
        self.bus.add_message_handler(self._on_message)
        await self._call_bus(
            "AddMatch",
            "s",
            [
                f"type='signal',sender='{BUS_DRIVER}',interface='{BUS_DRIVER}',"
                f"member='NameOwnerChanged',arg0='{SYSTEMD}'"
            ],
        )
        (self._systemd,) = await self._call_bus("GetNameOwner", "s", [SYSTEMD])
        await self._call_bus(
            "AddMatch",
            "s",
            [f"type='signal',sender='{SYSTEMD}',interface='{MANAGER_IFACE}',member='JobRemoved'"],
        )
        await self.call("Subscribe")

    def _on_message(self, msg: Message) -> bool | None:
        if msg.message_type != MessageType.SIGNAL:
            return None
        if (
            msg.sender == BUS_DRIVER
            and msg.member == "NameOwnerChanged"
            and msg.signature == "sss"
            and msg.body[0] == SYSTEMD
        ):
            self._systemd = msg.body[2]
            return None
        if (
            msg.interface == MANAGER_IFACE
            and msg.member == "JobRemoved"
            and msg.signature == "uoss"
            and self._systemd
            and msg.sender == self._systemd
        ):
            _job_id, job, _unit, result = msg.body
            future = self._job_future(job)
            if not future.done():
                future.set_result(result)
            self._forget_finished()
        return None

    def _job_future(self, job: str) -> asyncio.Future[str]:
        future = self._jobs.get(job)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._jobs[job] = future
        return future

    def _forget_finished(self) -> None:
        finished = [job for job, future in self._jobs.items() if future.done()]
        for job in finished[: max(0, len(finished) - FINISHED_KEPT)]:
            del self._jobs[job]

    async def _call_bus(self, member: str, signature: str = "", body: list[Any] | None = None) -> Any:
        return await self._call(
            "the bus", BUS_DRIVER, BUS_DRIVER_PATH, BUS_DRIVER, member, signature, body or []
        )

    async def call(
        self,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        path: str = SYSTEMD_PATH,
        interface: str = MANAGER_IFACE,
    ) -> list[Any]:
        return list(await self._call("systemd", SYSTEMD, path, interface, member, signature, body or []))

    async def _call(
        self,
        who: str,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str,
        body: list[Any],
    ) -> Any:
        try:
            reply = await dbuscall.call(
                self.bus, destination, path, interface, member, signature, body, self.job_timeout
            )
        except TimeoutError:
            raise JobTimeout(f"{who} did not answer {member} within {self.job_timeout:g}s") from None
        return _body(reply)

    async def _wait_job(self, job: str, what: str) -> None:
        """Wait for `job` to be removed; its result must be "done"."""
        future = self._job_future(job)
        try:
            # Shielded: one waiter giving up must not end the others' wait.
            async with asyncio.timeout(self.job_timeout):
                result = await asyncio.shield(future)
        except TimeoutError:
            raise JobTimeout(
                f"{what}: systemd's job {job} did not finish within {self.job_timeout:g}s"
            ) from None
        if result != "done":
            raise SystemdError(f"{what}: systemd's job ended with {result!r}")

    async def start_scope(
        self,
        name: str,
        pid: int,
        description: str,
        limits: ScopeLimits,
        slice_: str = SLICE,
        extra_pids: Sequence[int] = (),
    ) -> None:
        """Put `pid` (and `extra_pids`) into a new transient scope `name`; wait until it is running."""
        properties = [
            ["PIDs", Variant("au", [pid, *extra_pids])],
            ["Slice", Variant("s", slice_)],
            ["Description", Variant("s", description)],
            ["MemoryMax", Variant("t", limits.memory_max)],
            ["CPUQuotaPerSecUSec", Variant("t", limits.cpu_quota_per_sec_usec)],
            ["TasksMax", Variant("t", limits.tasks_max)],
            ["CollectMode", Variant("s", "inactive-or-failed")],
            # An OOM kill in the scope kills all of it at once (memory.oom.group): a VM is
            # never left without its virtiofsd, and QEMU's end is the OOM killer's SIGKILL.
            ["OOMPolicy", Variant("s", "kill")],
        ]
        try:
            (job,) = await self.call("StartTransientUnit", "ssa(sv)a(sa(sv))", [name, "fail", properties, []])
        except DBusError as e:
            raise SystemdError(f"cannot create {name}: {e.text}") from None
        await self._wait_job(job, f"cannot start {name}")

    async def set_limits(self, name: str, limits: ScopeLimits) -> None:
        """Change a running scope's limits (a resized VM's), at runtime only."""
        properties = [
            ["MemoryMax", Variant("t", limits.memory_max)],
            ["CPUQuotaPerSecUSec", Variant("t", limits.cpu_quota_per_sec_usec)],
            ["TasksMax", Variant("t", limits.tasks_max)],
        ]
        try:
            await self.call("SetUnitProperties", "sba(sv)", [name, True, properties])
        except DBusError as e:
            raise SystemdError(f"cannot change the limits of {name}: {e.text}") from None

    async def unit_state(self, name: str) -> str | None:
        """The unit's ActiveState, or None when systemd does not know it (any more)."""
        try:
            (path,) = await self.call("GetUnit", "s", [name])
            (state,) = await self.call(
                "Get",
                "ss",
                ["org.freedesktop.systemd1.Unit", "ActiveState"],
                path=path,
                interface="org.freedesktop.DBus.Properties",
            )
        except DBusError as e:
            if e.type in (NO_SUCH_UNIT, "org.freedesktop.DBus.Error.UnknownObject"):
                return None
            raise
        return str(state.value)

    async def stop_unit(self, name: str) -> None:
        """Stop `name` and wait for it; a unit that is already gone is fine."""
        try:
            (job,) = await self.call("StopUnit", "ss", [name, "replace"])
        except DBusError as e:
            if e.type == NO_SUCH_UNIT:
                return
            raise SystemdError(f"cannot stop {name}: {e.text}") from None
        try:
            await self._wait_job(job, f"cannot stop {name}")
        except JobTimeout:
            raise
        except SystemdError as e:
            # Canceled or merged: wait_gone says whether the unit went away.
            log.debug("%s", e)

    async def wait_gone(self, name: str, timeout: float = 10) -> None:  # noqa: ASYNC109
        """Wait until the unit is no longer loaded (stopped and collected)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            state = await self.unit_state(name)
            if state is None:
                return
            if state in ("inactive", "failed"):
                with contextlib.suppress(DBusError):
                    await self.call("ResetFailedUnit", "s", [name])
            if loop.time() > deadline:
                log.warning("%s is still %s after %.0fs", name, state, timeout)
                return
            await asyncio.sleep(0.05)

    async def scope_of_pid(self, pid: int) -> str | None:
        try:
            (path,) = await self.call("GetUnitByPID", "u", [pid])
            (unit_id,) = await self.call(
                "Get",
                "ss",
                ["org.freedesktop.systemd1.Unit", "Id"],
                path=path,
                interface="org.freedesktop.DBus.Properties",
            )
        except DBusError:
            return None
        return str(unit_id.value)
