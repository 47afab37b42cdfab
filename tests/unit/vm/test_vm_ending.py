"""How a VM's QEMU ended, as a sentence and as its container processes' exit status."""

from __future__ import annotations

import asyncio
import logging

import pytest

from spinbox.daemon.endings import Endings
from spinbox.shim import exits
from spinbox.vm.ending import UNKNOWN_STATUS, Ending


def test_a_qemu_killed_by_a_signal_gives_128_plus_the_signal() -> None:
    killed = Ending(-9)
    assert killed.container_status == 137
    assert killed.reason == "QEMU was killed by SIGKILL, not by spinbox"
    assert Ending(-15).container_status == 143
    assert Ending(-9, requested="kill").reason == "spinbox killed QEMU (SIGKILL) to stop the VM"


def test_each_ending_has_its_cause_word() -> None:
    assert Ending(-9).cause == "signal"
    assert Ending(-9, requested="kill").cause == "requested"
    assert Ending(0, requested="stop").cause == "requested"
    assert Ending(0).cause == Ending(1).cause == "exit"
    assert Ending(1, panicked=True).cause == "panic"
    assert Ending(None).cause == "unknown"
    oom = Ending(-9, oom_limit=805306368)
    assert oom.cause == "oom-kill" and oom.container_status == 137
    assert oom.reason == (
        "the VM's scope reached its memory limit (MemoryMax=805306368 bytes) "
        "and the kernel's OOM killer ended QEMU (SIGKILL)"
    )


def test_other_ends_give_the_unknown_status_and_say_why() -> None:
    panic = Ending(1, panicked=True)
    assert panic.container_status == UNKNOWN_STATUS == 255
    assert "guest kernel panicked" in panic.reason
    assert Ending(None).container_status == 255
    assert "unknown" in Ending(None).reason
    assert Ending(1).reason == "QEMU exited with status 1"
    assert Ending(0, requested="stop").reason == "QEMU exited normally as spinbox asked"


def test_endings_are_said_once_and_the_last_ones_kept(caplog: pytest.LogCaptureFixture) -> None:
    endings = Endings(kept=2)
    lines: list[tuple[str, str, int]] = []
    with caplog.at_level(logging.INFO):
        endings.record("a", Ending(-9), 41, lambda *line: lines.append(line))
        endings.record("b", Ending(0, requested="stop"), 42)
        endings.record("c", Ending(None), 43)
    assert "a" not in endings and endings.get("c") == Ending(None)
    said = (
        "VM a: QEMU was killed by SIGKILL, not by spinbox (QEMU pid 41); "
        "the processes in it end with exit status 137"
    )
    assert lines == [("spinboxd", said, 4)]
    assert said in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert not any("VM b" in w for w in warnings)


class _Lost:
    def __init__(self, answer: tuple[int, str, str] | Exception) -> None:
        self.answer = answer

    async def __call__(self) -> tuple[int, str, str]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_a_lost_process_takes_the_status_spinboxd_gives() -> None:
    class Container:
        vm_ending = _Lost((137, "QEMU was killed by SIGKILL, not by spinbox", "signal"))

    answer = asyncio.run(exits.vm_ended(Container()))  # type: ignore[arg-type]
    assert answer == (137, "QEMU was killed by SIGKILL, not by spinbox", "signal")
    Container.vm_ending = _Lost(RuntimeError("no bus"))
    status, reason, cause = asyncio.run(exits.vm_ended(Container()))  # type: ignore[arg-type]
    assert (status, reason, cause) == (255, "spinboxd cannot say how the VM ended: no bus", "")
