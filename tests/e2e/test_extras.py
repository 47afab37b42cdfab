"""User paths beyond run and exec, with containerd 2.x: `nerdctl commit` of a
spinbox container (its writable layer never mounted on the host), `ctr run -t`
with its terminal size, `nerdctl update` of the memory limit, and an OCI
poststop hook on the host."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator

import pytest

from tests.e2e.stack import BUILDS, IMAGE, NERDCTL, NOTHING_LEFT, RUNTIME, Containerd, wait_until_clean
from tests.harness.mounts import HostMountWatch
from tests.harness.systemd import PrivateSystemd


@pytest.fixture(scope="module")
def containerd(stack: PrivateSystemd) -> Iterator[Containerd]:
    build = BUILDS["2.x"]
    if not build.available:
        pytest.skip("containerd 2.x is not installed (tools/install-test-clients)")
    with Containerd.running(stack, build) as instance:
        yield instance


MIB = 1024 * 1024


def memory_limit(containerd: Containerd, container_id: str) -> int:
    """The memory limit `ctr task metrics` reports (cgroup v2's memory.max)."""
    metrics = containerd.ctr("task", "metrics", container_id).stdout
    (limit,) = [line.split()[1] for line in metrics.splitlines() if line.startswith("memory.usage_limit")]
    return int(limit)


def test_nerdctl_update_and_commit(containerd: Containerd, stack: PrivateSystemd) -> None:
    # One container: nerdctl update changes its memory limit (ctr has no `task
    # update`); nerdctl commit (which pauses the task) keeps its writes and deletions.
    # The writable layer leaves each VM as a stream: throughout, no host mount or loop device of it.
    if not NERDCTL.exists():
        pytest.skip("nerdctl is not installed (tools/install-test-clients)")
    script = (
        "echo persisted > /marker; rm /etc/group; echo aaaa > /edited; touch -r /etc/passwd /edited;"
        " touch /written; sleep 1000"
    )
    with HostMountWatch(stack) as watch:
        container_id = containerd.nerdctl(
            "run", "-d", "--runtime", RUNTIME, "--network", "none", "--memory", "256m", "--name", "c1",
            IMAGE, "sh", "-c", script,
        ).stdout.strip()  # fmt: skip
        try:
            assert memory_limit(containerd, container_id) == 256 * MIB
            containerd.nerdctl("update", "--memory", "96m", "c1")
            assert memory_limit(containerd, container_id) == 96 * MIB
            stack.wait_for(
                "c1 to have written",
                lambda: containerd.nerdctl("exec", "c1", "ls", "/written", check=False).returncode == 0,
                timeout=120,
            )
            # A pause writes the layer back; then /edited changes in place, keeping its size and mtime.
            containerd.nerdctl("pause", "c1")
            containerd.nerdctl("unpause", "c1")
            edit = "echo bbbb > /edited; touch -r /etc/passwd /edited"
            containerd.nerdctl("exec", "c1", "sh", "-c", edit)
            containerd.nerdctl("commit", "c1", "localhost/committed:latest")
        finally:
            containerd.nerdctl("rm", "-f", "c1", check=False)
    assert watch.polls > 100
    assert watch.seen_for(container_id) == []
    try:
        result = containerd.nerdctl(
            "run", "--rm", "--runtime", RUNTIME, "--network", "none", "localhost/committed:latest",
            "sh", "-c", "cat /marker /edited; ls /etc",
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        marker, edited, *etc = result.stdout.split()
        assert marker == "persisted"
        assert edited == "bbbb"
        # The deletion is a whiteout in the new image; the mount points of
        # nerdctl's /etc/hosts, hostname and resolv.conf are in it, as with runc.
        assert "passwd" in etc
        assert "group" not in etc
    finally:
        containerd.nerdctl("rmi", "-f", "localhost/committed:latest", check=False)
        # nerdctl v2.1 leaves its client-side FIFOs behind, with runc as well.
        stack.run("sh", "-c", "rm -rf /run/containerd/fifo/*")
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_run_with_terminal_follows_resizes(containerd: Containerd, stack: PrivateSystemd) -> None:
    # ctr gets a 33x77 terminal from script(1) and passes its size on to the
    # guest's; once the container is up, the terminal becomes 40x90 (SIGWINCH).
    ctr = shlex.join(containerd.ctr_argv()[len(stack.nsenter()) :])
    guest = 'tty; stty size; touch /up; while [ "$(stty size)" = "33 77" ]; do sleep 0.1; done; stty size'
    host = (
        "stty rows 33 cols 77; "
        f"{ctr} run -t --rm --runtime {RUNTIME} {IMAGE} t1 sh -c {shlex.quote(guest)} & "
        f"until {ctr} task exec --exec-id up t1 test -e /up 2>/dev/null; do sleep 0.2; done; "
        "stty rows 40 cols 90; kill -WINCH $!; wait $!"
    )
    result = stack.run("script", "-qec", host, "/dev/null", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.replace("\r", "").splitlines() if line]
    assert "/dev/pts/" in lines[0], result.stdout
    assert lines[1:] == ["33 77", "40 90"], result.stdout
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


# ctr has no flag for hooks; a CDI device (which ctr 2.x resolves from /etc/cdi) brings one.
CDI_SPEC = {
    "cdiVersion": "0.6.0",
    "kind": "spinbox.test/hooks",
    "devices": [{"name": "poststop", "containerEdits": {"env": ["SPINBOX_CDI=applied"]}}],
    "containerEdits": {
        "hooks": [
            {
                "hookName": "poststop",
                "path": "/bin/sh",
                "args": ["sh", "-c", "cat > /run/spinbox-e2e-poststop.json"],
            }
        ]
    },
}


def test_poststop_hook_runs_on_the_host_after_delete(containerd: Containerd, stack: PrivateSystemd) -> None:
    stack.write_file("/etc/cdi/spinbox-e2e.json", json.dumps(CDI_SPEC))
    state = stack.path("/run/spinbox-e2e-poststop.json")
    try:
        result = containerd.ctr(
            "run", "--rm", "--runtime", RUNTIME, "--device", "spinbox.test/hooks=poststop",
            IMAGE, "h1", "sh", "-c", "echo $SPINBOX_CDI",
        )  # fmt: skip
        assert result.stdout == "applied\n"
        # The hook got the container's state on stdin.
        assert json.loads(state.read_text())["id"] == "h1"
    finally:
        stack.path("/etc/cdi/spinbox-e2e.json").unlink()
        state.unlink(missing_ok=True)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
