"""A call into the guest that misses its deadline has spinboxd record where the guest is,
in the background and one request at a time."""

from __future__ import annotations

import asyncio
import logging

import pytest

from spinbox.busclient import SpinboxdError
from spinbox.shim.guestwatch import GuestWatch

VM = "/org/spinstack/Spinbox/vm/default_2dc1"


class FakeSpinboxd:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[str, str]] = []
        self.release = asyncio.Event()

    async def record_guest_state(self, path: str, reason: str) -> None:
        self.calls.append((path, reason))
        await self.release.wait()
        if self.fail:
            raise SpinboxdError("org.spinstack.Spinbox.Error.Failed", "VM 'default-c1' is stopping")


def test_one_record_at_a_time_and_the_log_says_where(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> FakeSpinboxd:
        spinboxd = FakeSpinboxd()

        async def connect() -> FakeSpinboxd:
            return spinboxd

        watch = GuestWatch(connect, "default-c1", VM)  # type: ignore[arg-type]
        watch("Agent/UpdateResources: the guest did not answer within 60 s")
        await asyncio.sleep(0)
        watch("Agent/Signal: the guest did not answer within 60 s")  # while the first is made
        spinboxd.release.set()
        assert watch.task is not None
        await watch.task
        watch("Agent/Kill: the guest did not answer within 60 s")  # a later miss: a record of its own
        assert watch.task is not None
        await watch.task
        return spinboxd

    with caplog.at_level(logging.WARNING):
        spinboxd = asyncio.run(scenario())
    assert [reason.split(":")[0] for _, reason in spinboxd.calls] == ["Agent/UpdateResources", "Agent/Kill"]
    assert {path for path, _ in spinboxd.calls} == {VM}
    assert "recorded in `journalctl -u spinbox-vm-default-c1.scope`" in caplog.text


def test_a_record_spinboxd_refuses_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        spinboxd = FakeSpinboxd(fail=True)
        spinboxd.release.set()

        async def connect() -> FakeSpinboxd:
            return spinboxd

        watch = GuestWatch(connect, "default-c1", VM)  # type: ignore[arg-type]
        watch("Agent/Signal: the guest did not answer within 60 s")
        assert watch.task is not None
        await watch.task

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert "spinboxd could not record where VM default-c1's guest is: " in caplog.text
    assert "is stopping" in caplog.text
