"""The state machine of one process."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from spinbox.shim.process import Process, StateError, Status


def test_life_of_a_process() -> None:
    proc = Process("c1", "")
    assert proc.status == Status.CREATED
    proc.started(42)
    assert (proc.status, proc.pid) == (Status.RUNNING, 42)
    proc.check_pause()
    proc.paused()
    assert proc.status == Status.PAUSED
    proc.check_resume()
    proc.resumed()
    proc.exited(143, datetime.now(UTC))
    assert proc.status == Status.STOPPED
    assert proc.exit is not None and proc.exit.status == 143
    proc.check_delete()


def test_exit_is_recorded_once() -> None:
    proc = Process("c1", "e1")
    proc.started(1)
    proc.exited(3, datetime.now(UTC))
    proc.exited(9, datetime.now(UTC))
    assert proc.exit is not None and proc.exit.status == 3


@pytest.mark.parametrize(
    ("setup", "check", "code", "message"),
    [
        ("running", "check_start", "FAILED_PRECONDITION", "already started"),
        ("stopped", "check_start", "FAILED_PRECONDITION", "already exited"),
        ("running", "check_delete", "FAILED_PRECONDITION", "kill it before deleting"),
        ("stopped", "check_signal", "NOT_FOUND", "already exited"),
        ("created", "check_pause", "FAILED_PRECONDITION", "not running"),
        ("running", "check_resume", "FAILED_PRECONDITION", "not paused"),
    ],
)
def test_refusals_carry_codes_and_sentences(setup: str, check: str, code: str, message: str) -> None:
    proc = Process("c1", "")
    if setup in ("running", "stopped"):
        proc.started(1)
    if setup == "stopped":
        proc.exited(0, datetime.now(UTC))
    with pytest.raises(StateError, match=message) as caught:
        getattr(proc, check)()
    assert caught.value.code == code
    assert "container 'c1'" in caught.value.message


def test_wait_returns_the_exit() -> None:
    async def scenario() -> int:
        proc = Process("c1", "")
        proc.started(1)
        waiter = asyncio.create_task(proc.wait())
        await asyncio.sleep(0)
        assert not waiter.done()
        proc.exited(128 + 15, datetime.now(UTC))
        return (await waiter).status

    assert asyncio.run(scenario()) == 143
