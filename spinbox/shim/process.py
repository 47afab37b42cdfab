"""The life of one process (a container's init or an exec) as containerd sees
it. Every state change goes through `Process`, and each refusal is a
`StateError` carrying the ttrpc code containerd expects."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from datetime import datetime

from spinbox.shim.errors import ShimError


class Status(enum.IntEnum):
    """containerd.v1.types.Status values."""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5


class StateError(ShimError):
    """A request that the process's state does not allow."""


@dataclass(frozen=True)
class Exit:
    """How and when a process ended."""

    pid: int
    status: int
    at: datetime


@dataclass
class Process:
    """A container's init or exec process, and its state."""

    container_id: str
    exec_id: str  # "" for the container's init process
    terminal: bool = False
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    pid: int = 0
    status: Status = Status.CREATED
    exit: Exit | None = None
    deleted: bool = False
    _exited: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def name(self) -> str:
        if self.exec_id:
            return f"exec {self.exec_id!r} of container {self.container_id!r}"
        return f"container {self.container_id!r}"

    def check_start(self) -> None:
        if self.status == Status.CREATED:
            return
        if self.status == Status.STOPPED:
            raise StateError("FAILED_PRECONDITION", f"{self.name} has already exited; it cannot start again")
        raise StateError("FAILED_PRECONDITION", f"{self.name} is already started")

    def started(self, pid: int) -> None:
        self.check_start()
        self.pid = pid
        self.status = Status.RUNNING

    def check_signal(self) -> None:
        if self.status == Status.STOPPED:
            raise StateError("NOT_FOUND", f"{self.name} has already exited")

    def check_delete(self) -> None:
        if self.status in (Status.RUNNING, Status.PAUSED, Status.PAUSING):
            raise StateError(
                "FAILED_PRECONDITION", f"{self.name} is still running; kill it before deleting it"
            )

    def check_pause(self) -> None:
        if self.status == Status.PAUSED:
            raise StateError("FAILED_PRECONDITION", f"{self.name} is already paused")
        if self.status != Status.RUNNING:
            raise StateError("FAILED_PRECONDITION", f"{self.name} is not running, so it cannot be paused")

    def check_resume(self) -> None:
        if self.status != Status.PAUSED:
            raise StateError("FAILED_PRECONDITION", f"{self.name} is not paused")

    def paused(self) -> None:
        if self.status == Status.RUNNING:
            self.status = Status.PAUSED

    def resumed(self) -> None:
        if self.status == Status.PAUSED:
            self.status = Status.RUNNING

    def exited(self, status: int, at: datetime) -> None:
        """Records the exit once; later reports of the same exit are ignored."""
        if self.exit is not None:
            return
        self.exit = Exit(self.pid, status, at)
        self.status = Status.STOPPED
        self._exited.set()

    async def wait(self) -> Exit:
        await self._exited.wait()
        assert self.exit is not None
        return self.exit
