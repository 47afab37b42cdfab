"""`ctr` and `nerdctl` running containers in spinbox VMs, with real containerd
1.6 and 2.x, spinboxd and guests. Each test boots as few VMs as the
behaviour it shows allows (under TCG a boot takes seconds)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import (
    BUILDS,
    IMAGE,
    NERDCTL,
    NOTHING_LEFT,
    RUNTIME,
    Containerd,
    task_topics,
    wait_until_clean,
)
from tests.harness.systemd import PrivateSystemd

SIXTEEN_MIB = 16 * 1024 * 1024


@pytest.fixture(scope="module", params=sorted(BUILDS), ids=lambda name: f"containerd-{name}")
def containerd(request: pytest.FixtureRequest, stack: PrivateSystemd) -> Iterator[Containerd]:
    build = BUILDS[request.param]
    if not build.available:
        pytest.skip(f"containerd {build.name} is not installed (tools/install-test-clients)")
    with Containerd.running(stack, build) as instance:
        yield instance


def guest_kernel_release() -> str:
    (kernel,) = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"))[-1:]
    return kernel.name.removeprefix("vmlinuz-")


def test_foreground_run_shows_guest_kernel_stdin_output_and_exit(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    # One VM: the guest's kernel, stdin forwarded, 16 MiB of output intact, the exit status.
    script = (
        "uname -r; cat; "
        f"head -c {SIXTEEN_MIB} /dev/urandom > /tmp/blob; sha256sum /tmp/blob >&2; cat /tmp/blob; exit 3"
    )
    with containerd.events() as events:
        result = containerd.run_bytes(
            "run", "--rm", "--runtime", RUNTIME, IMAGE, "fg1", "sh", "-c", script, stdin=b"hi\n"
        )
    assert result.returncode == 3, result.stderr.decode(errors="replace")
    release, stdin_echo, blob = result.stdout.split(b"\n", 2)
    assert release.decode() == guest_kernel_release()
    assert release.decode() != os.uname().release
    assert stdin_echo == b"hi"
    assert len(blob) == SIXTEEN_MIB
    assert hashlib.sha256(blob).hexdigest() == result.stderr.split()[0].decode()
    assert task_topics(events, "fg1") == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_detached_task_exec_signals_pause_metrics_and_spinboxd_restart(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    loop = "trap 'exit 0' TERM; while :; do sleep 0.1; done"
    with containerd.events() as events:
        containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "bg1", "sh", "-c", loop)
        try:
            assert containerd.tasks() == {"bg1": "RUNNING"}

            fed = containerd.ctr("task", "exec", "--exec-id", "e1", "bg1", "cat", input="via exec\n")
            assert fed.stdout == "via exec\n"
            # The container's programs, init and exec alike, have Linux's default personality: their
            # address layout is randomized, whatever vminitd runs crun with.
            personality = containerd.ctr(
                "task",
                "exec",
                "--exec-id",
                "p1",
                "bg1",
                "cat",
                "/proc/self/personality",
                "/proc/1/personality",
            )
            assert personality.stdout.split() == ["00000000", "00000000"]
            # The container outlives a restart of spinboxd, and everything below goes on working.
            stack.systemctl("restart", "spinbox.service")
            assert containerd.tasks() == {"bg1": "RUNNING"}

            tty = containerd.in_pty("task", "exec", "-t", "--exec-id", "e2", "bg1", "tty")
            assert tty.returncode == 0, tty.stdout + tty.stderr
            assert "/dev/pts/" in tty.stdout

            # An exec'd process killed by SIGTERM exits 128+15, as with runc.
            sleeper = subprocess.Popen(
                containerd.ctr_argv("task", "exec", "--exec-id", "e3", "bg1", "sleep", "600"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            stack.wait_for(
                "sleep in the container",
                lambda: "sleep 600" in containerd.ctr("task", "exec", "--exec-id", "ps", "bg1", "ps").stdout,
            )
            containerd.ctr("task", "kill", "-s", "TERM", "--exec-id", "e3", "bg1")
            assert sleeper.wait(timeout=120) == 143

            containerd.ctr("task", "pause", "bg1")
            assert containerd.tasks() == {"bg1": "PAUSED"}
            containerd.ctr("task", "resume", "bg1")
            assert containerd.tasks() == {"bg1": "RUNNING"}

            metrics = containerd.ctr("task", "metrics", "bg1").stdout
            assert "memory" in metrics

            containerd.ctr("task", "kill", "--all", "-s", "TERM", "bg1")
            stack.wait_for("bg1 to stop", lambda: containerd.tasks() == {"bg1": "STOPPED"}, timeout=120)
            containerd.ctr("task", "delete", "bg1")
        finally:
            containerd.ctr("task", "delete", "--force", "bg1", check=False)
            containerd.ctr("container", "delete", "bg1", check=False)
    topics = task_topics(events, "bg1")
    assert [t for t in topics if ":" not in t] == [
        "/tasks/create", "/tasks/start", "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete",
    ]  # fmt: skip
    for exec_id in ("e1", "e2", "e3"):
        mine = [t for t in topics if t.endswith(f":{exec_id}")]
        assert mine == [
            f"/tasks/exec-added:{exec_id}",
            f"/tasks/exec-started:{exec_id}",
            f"/tasks/exit:{exec_id}",
        ]
        assert topics.index("/tasks/start") < topics.index(mine[0])
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_memory_limit_sizes_the_vm_and_oom_is_reported(containerd: Containerd, stack: PrivateSystemd) -> None:
    # The container's limit holds inside a VM big enough for the guest: the
    # kernel's OOM killer ends it, and containerd hears of the OOM before the exit.
    with containerd.events() as events:
        result = containerd.ctr(
            "run", "--rm", "--memory-limit", str(32 * 1024 * 1024), "--runtime", RUNTIME, IMAGE, "oom1",
            "sh", "-c", "tail /dev/zero", check=False,
        )  # fmt: skip
    assert result.returncode == 137, result.stderr
    assert task_topics(events, "oom1") == [
        "/tasks/create", "/tasks/start", "/tasks/oom", "/tasks/exit", "/tasks/delete",
    ]  # fmt: skip
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_killed_shim_is_cleaned_up_by_delete(containerd: Containerd, stack: PrivateSystemd) -> None:
    containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "dead1", "sleep", "600")
    try:
        (shim,) = stack.processes("containerd-shim-spinbox-v1 .*-id dead1")
        assert stack.run("systemctl", "list-units", "--plain", "--no-legend", "spinbox-vm-*").stdout
        stack.run("kill", "-KILL", str(shim))
        # containerd sees the shim go, runs `containerd-shim-spinbox-v1 delete`, and marks the task stopped.
        stack.wait_for(
            "the task to stop", lambda: containerd.tasks().get("dead1") in ("STOPPED", None), timeout=120
        )
    finally:
        containerd.ctr("task", "delete", "dead1", check=False)
        containerd.ctr("container", "delete", "dead1", check=False)
        # `ctr run -d` leaves its FIFOs to a later `ctr task delete`, which has no task to
        # load once the shim is gone (with any runtime): they are ctr's, not spinbox's.
        stack.run("sh", "-c", "rm -rf $(dirname /run/containerd/fifo/*/dead1-stdout)", check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_missing_entrypoint_is_a_readable_error(containerd: Containerd, stack: PrivateSystemd) -> None:
    result = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, IMAGE, "bad1", "/no/such/program", check=False
    )
    assert result.returncode != 0
    assert "/no/such/program" in result.stderr
    assert "Traceback" not in result.stderr
    containerd.ctr("container", "delete", "bad1", check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_nerdctl_run(containerd: Containerd, stack: PrivateSystemd) -> None:
    if containerd.build.name == "1.6":
        pytest.skip("nerdctl v2 needs containerd 1.7 or newer")
    if not NERDCTL.exists():
        pytest.skip("nerdctl is not installed (tools/install-test-clients)")
    result = containerd.nerdctl("run", "--rm", "--runtime", RUNTIME, IMAGE, "echo", "ok", check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
    # nerdctl v2.1 leaves its client-side FIFOs behind, with runc as well.
    stack.run("sh", "-c", "rm -rf /run/containerd/fifo/*")
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
