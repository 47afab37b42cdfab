"""The serving shim stops on SIGTERM and SIGINT, however long its loop has been idle
and also when the signal came before its loop ran, without loading what it puts off
(inspect: see spinbox.shim.__main__)."""

from __future__ import annotations

import pytest

from tests.harness.imports import loaded_after

STOPS = """
from spinbox.shim.__main__ import server_entry
server_entry()
import asyncio, os, signal
from spinbox.shim.server import StopSignals

signum = signal.Signals[sys.argv[1]]
early = sys.argv[2] == "early"
signals = StopSignals()
if early:
    os.kill(os.getpid(), signum)

async def main():
    done = asyncio.Event()
    with signals.watch(done):
        await asyncio.sleep(0.2)  # idle in the selector when the signal comes
        if not early:
            os.kill(os.getpid(), signum)
        async with asyncio.timeout(10):
            await done.wait()

asyncio.run(main())
signals.close()
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
"""


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("when", ["idle", "early"])
def test_a_stop_signal_ends_the_serving_loop(signum: str, when: str) -> None:
    loaded = loaded_after(STOPS, [signum, when])
    assert "ast" not in loaded, "the signal handling loaded inspect"


def test_another_signal_does_not_stop_it() -> None:
    code = """
from spinbox.shim.server import StopSignals
import asyncio, os, signal

signal.signal(signal.SIGUSR1, lambda *a: None)
signals = StopSignals()

async def main():
    done = asyncio.Event()
    with signals.watch(done):
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.sleep(0.5)
    assert not done.is_set()

asyncio.run(main())
signals.close()
"""
    loaded_after(code)
