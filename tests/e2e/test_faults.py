"""Faults a user's host will see, each with what the user must get: a guest
that stops answering (its QEMU SIGSTOPped) fails `ctr run` within the
configured deadline, with a sentence naming the VM and the step, and the VM
is cleaned up."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator

import pytest

from spinbox import statefile
from tests.e2e.stack import BUILDS, IMAGE, NOTHING_LEFT, RUNTIME, Containerd, wait_until_clean
from tests.e2e.test_network import NO_NETWORK_LEFT, network_leftovers
from tests.harness.systemd import PrivateSystemd

CONFIG = "/etc/spinbox/spinbox.toml"
CREATE_DEADLINE = 60


@pytest.fixture(scope="module")
def containerd(stack: PrivateSystemd) -> Iterator[Containerd]:
    build = BUILDS["2.x"] if BUILDS["2.x"].available else BUILDS["1.6"]
    with Containerd.running(stack, build) as instance:
        yield instance


@pytest.fixture
def create_deadline(stack: PrivateSystemd) -> Iterator[int]:
    original = stack.path(CONFIG).read_text()
    stack.write_file(CONFIG, f"{original}\n[timeouts]\ncreate = {CREATE_DEADLINE}\n")
    stack.systemctl("restart", "spinbox.service")
    try:
        yield CREATE_DEADLINE
    finally:
        stack.write_file(CONFIG, original)
        stack.systemctl("restart", "spinbox.service")


def test_a_guest_that_stops_answering_fails_the_create_within_the_deadline(
    containerd: Containerd, stack: PrivateSystemd, create_deadline: int
) -> None:
    run = subprocess.Popen(
        containerd.ctr_argv("run", "--rm", "--runtime", RUNTIME, IMAGE, "frozen1", "true"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        state = stack.path(f"/run/spinbox/vm/default-frozen1/{statefile.FILE}")
        qemu: list[int] = []

        def qemu_started() -> bool:
            # The pid is recorded once QEMU answers QMP: the guest is booting.
            with contextlib.suppress(OSError, ValueError):
                qemu[:] = [(statefile.read_section(state, statefile.DAEMON) or {}).get("pid", 0)]
            return bool(qemu and qemu[0])

        stack.wait_for("QEMU of VM default-frozen1", qemu_started, timeout=120, interval=0.05)
        stopped_at = time.monotonic()
        stack.run("kill", "-STOP", str(qemu[0]))
        _, stderr = run.communicate(timeout=create_deadline + 120)
        failed_after = time.monotonic() - stopped_at
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode != 0
    assert f"VM 'default-frozen1' was not created within {create_deadline}s (timeouts.create)" in stderr, (
        stderr
    )
    assert "did not finish" in stderr and "journalctl -u spinbox-vm-default-frozen1.scope" in stderr, stderr
    assert failed_after < create_deadline + 60, failed_after
    containerd.ctr("container", "delete", "frozen1", check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
    assert network_leftovers(stack) == NO_NETWORK_LEFT
    journal = stack.journal("-u", "spinbox.service")
    assert (
        "default-frozen1: waiting for the guest's agent did not finish within timeouts.create" in journal
        or ("default-frozen1: " in journal and "did not finish within timeouts.create" in journal)
    ), journal[-3000:]
