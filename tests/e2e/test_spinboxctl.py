"""spinboxctl speaks of containers as the user named them: `ctr run ... u1`
is `spinboxctl status u1` in containerd's default namespace. One container
(one VM) serves every check here."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.e2e.stack import BUILDS, IMAGE, NOTHING_LEFT, RUNTIME, Containerd, wait_until_clean
from tests.harness.systemd import PrivateSystemd
from tests.integration.daemon.spinboxd import PYTHON, TOP

CTL = ("env", f"PYTHONPATH={TOP}", str(PYTHON), "-m", "spinbox.cli")


def read_until(process: subprocess.Popen[bytes], text: str, timeout: float) -> str:
    """What the process printed until `text` appeared, it ended, or `timeout` seconds passed."""
    assert process.stdout is not None
    fd, out = process.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while text.encode() not in out and (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], remaining)
        chunk = os.read(fd, 65536) if ready else b""
        if ready and not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


def spinboxctl(stack: PrivateSystemd, *args: str, check: bool = True) -> str:
    result = stack.run(*CTL, *args, check=check)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def containerd(stack: PrivateSystemd) -> Iterator[Containerd]:
    with Containerd.running(stack, BUILDS["1.6"]) as instance:
        yield instance


def test_spinboxctl_names_a_container_by_its_id(containerd: Containerd, stack: PrivateSystemd) -> None:
    containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "u1", "sleep", "3600")
    try:
        status = spinboxctl(stack, "status", "u1")
        assert re.search(r"Id\s+default-u1\n", status), status
        assert re.search(r"Namespace\s+default\n", status) and re.search(r"Container\s+u1\n", status), status
        assert re.search(r"State\s+running\n", status), status
        # The full VM id still names it; another namespace has no u1.
        assert re.search(r"Container\s+u1\n", spinboxctl(stack, "status", "default-u1"))
        elsewhere = spinboxctl(stack, "status", "-n", "other", "u1", check=False)
        assert "there is no VM for container 'u1' in namespace 'other'" in elsewhere, elsewhere

        listing = spinboxctl(stack, "list").splitlines()
        assert re.match(r"NAMESPACE\s+CONTAINER\s+ID\s+STATE", listing[0]), listing
        assert any(re.match(r"default\s+u1\s+default-u1\s+running\s", line) for line in listing), listing

        # top: CPU from the scope's cpu.stat. memory.current needs the memory
        # controller, which the test's private systemd does not have ("-").
        table = spinboxctl(stack, "top", "--once", "--interval", "0.5").splitlines()
        assert table[0].split()[:5] == ["NAMESPACE", "CONTAINER", "ID", "STATE", "CPU%"], table
        row = next(line.split() for line in table if re.match(r"default\s+u1\s+default-u1\s", line))
        assert re.fullmatch(r"\d+\.\d", row[4]), row
        assert re.fullmatch(r"\d+\.\ds", row[5]) and float(row[5][:-1]) > 0, row

        # logs -f shows the VM's journal, then follows it: an exec's exit,
        # which vminitd logs after the command started, arrives too.
        follow = stack.popen(
            *CTL, "logs", "-f", "--lines", "100000", "u1",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        try:
            # (The stack's guest kernel boots with "quiet": vminitd's lines are the ones to look for.)
            assert "created container u1" in read_until(follow, "created container u1", 120)
            containerd.ctr("task", "exec", "--exec-id", "tick", "u1", "true")
            assert "exited with status 0" in read_until(follow, "exited with status 0", 120)
            assert follow.poll() is None
        finally:
            os.killpg(follow.pid, signal.SIGTERM)  # nsenter, spinboxctl and the journalctl it became
            follow.wait(30)

        # The shim's server shows in ps under the shim's name, as containerd-shim-runc-v2 would.
        shims = stack.run("pgrep", "-a", "-f", "containerd-shim-spinbox-v1 -namespace default -id u1").stdout
        assert "spinbox.shim" not in shims and shims.count("\n") == 1, shims
    finally:
        containerd.ctr("task", "kill", "-s", "KILL", "u1", check=False)
        containerd.ctr("task", "delete", "-f", "u1", check=False)
        containerd.ctr("container", "delete", "u1", check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
