"""System containers with containerd 2.x: a Debian image with systemd and Docker
(built locally by mmdebstrap, tests/harness/debimage.py) run privileged with
/sbin/init boots systemd to its default target, runs a nested Docker container
that reaches the VM's gateway, leaves nothing of it on the host, and stops on
`ctr task kill` and `nerdctl stop` within the stop timeout.

One VM carries the systemd and Docker checks (a systemd boot under TCG takes
minutes on a busy machine); the nerdctl stop needs a second, smaller one. The timings
(plain VM boot, inner systemd to `running`, nested `docker run` to its output) are printed;
run with -s to see them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.e2e.stack import BUILDS, IMAGE, NERDCTL, NOTHING_LEFT, RUNTIME, Containerd, wait_until_clean
from tests.harness.debimage import NESTED_PATH, NESTED_REFERENCE, build_syscont_image
from tests.harness.fixtures import artifacts_dir
from tests.harness.systemd import PrivateSystemd, host_leftovers

BRIDGE_ADDRESS = "10.77.0.1"  # the gateway of spinbox's own CNI network (ctr run)
# Docker's images live on a tmpfs: its overlay2 driver cannot use the container's rootfs
# (itself an overlay in the guest) as the upper layer.
DOCKER_TMPFS = "type=tmpfs,src=tmpfs,dst=/var/lib/docker,options=rw:nosuid:nodev:size=512m"
MEMORY = "io.spinbox.memory-mib=1536"
# Seconds the stops below allow before they would SIGKILL; systemd stops Docker and containerd
# first, which under TCG on a busy machine takes a while.
STOP_TIMEOUT = 120.0
TIMINGS: dict[str, float] = {}


def record(name: str, seconds: float) -> None:
    TIMINGS[name] = seconds
    print(f"\n{name}: {seconds:.1f} s", flush=True)


# The first test's setup builds the image (minutes, once: it is cached) and boots systemd under TCG.
pytestmark = [pytest.mark.timeout(2400), pytest.mark.long]


@pytest.fixture(scope="module")
def containerd(stack: PrivateSystemd) -> Iterator[Containerd]:
    build = BUILDS["2.x"]
    if not build.available:
        pytest.skip("containerd 2.x is not installed (tools/install-test-clients)")
    with Containerd.running(stack, build) as instance:
        yield instance


@pytest.fixture(scope="module")
def image(containerd: Containerd) -> Iterator[str]:
    built = build_syscont_image(artifacts_dir() / "images")
    if built.seconds:
        print(f"\nsystem container image: built in {built.seconds:.0f} s, {built.size / 1e6:.0f} MB")
    containerd.ctr("images", "import", str(built.path), timeout=900)
    # A plain VM's boot in this run, to compare the system container's with.
    start = time.monotonic()
    containerd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "plain", "true")
    record("plain VM: ctr run --rm busybox true", time.monotonic() - start)
    yield built.reference
    containerd.ctr("images", "rm", built.reference, check=False)


# systemctl needs systemd's socket, and `is-system-running --wait` may give up ("unknown",
# its bus connection timed out) while a slow boot still runs: ask again until it has an answer.
WAIT_FOR_SYSTEMD = """
until [ -S /run/systemd/private ]; do sleep 0.2; done
while :; do
    state=$(systemctl is-system-running --wait 2>/dev/null)
    case "$state" in initializing|starting|unknown|"") sleep 1 ;; *) echo "$state"; break ;; esac
done
"""
# systemd in a container reads its "kernel command line" from its own arguments. Under TCG on a
# busy machine, containerd.service alone took longer than systemd's default 90 s start timeout.
INIT = ("/sbin/init", "systemd.default_timeout_start_sec=600")
BOOT_TIMEOUT = 900  # seconds; a systemd boot under TCG on a busy 2-core machine takes minutes


def is_system_running(containerd: Containerd, container_id: str, exec_id: str) -> str:
    """systemd's state once it finished starting."""
    result = containerd.ctr(
        "task", "exec", "--exec-id", exec_id, container_id,
        "timeout", str(BOOT_TIMEOUT), "sh", "-c", WAIT_FOR_SYSTEMD,
        check=False, timeout=BOOT_TIMEOUT + 60,
    )  # fmt: skip
    return result.stdout.strip() or f"(no answer: {result.stderr.strip()})"


@pytest.fixture(scope="module")
def booted(containerd: Containerd, image: str) -> Iterator[str]:
    """The system container, once systemd inside says it finished booting."""
    start = time.monotonic()
    containerd.ctr(
        "run", "-d", "--privileged", "--runtime", RUNTIME, "--annotation", MEMORY,
        "--mount", DOCKER_TMPFS, image, "sc1", *INIT, timeout=900,
    )  # fmt: skip
    try:
        state = is_system_running(containerd, "sc1", "boot")
        record("system container: ctr run to systemd running", time.monotonic() - start)
        failed = containerd.ctr("task", "exec", "--exec-id", "failed", "sc1", "systemctl", "--failed",
                                "--no-legend", check=False).stdout  # fmt: skip
        assert state in ("running", "degraded"), f"systemd is {state!r}; failed units:\n{failed}"
        if state == "degraded":
            print(f"\nsystemd is degraded; failed units:\n{failed}")
        yield "sc1"
    finally:
        containerd.ctr("task", "rm", "-f", "sc1", check=False)
        containerd.ctr("containers", "rm", "sc1", check=False)


# What explains a failure inside: the failed units and the last journal lines of Docker's.
INNER_DIAGNOSIS = """
systemctl --failed --no-legend
journalctl --no-pager -o short-monotonic -n 60 -u docker.service -u docker.socket -u containerd.service
"""


def inner_diagnosis(containerd: Containerd, container_id: str) -> str:
    result = containerd.ctr(
        "task", "exec", "--exec-id", f"why-{time.monotonic_ns()}", container_id, "sh", "-c", INNER_DIAGNOSIS,
        check=False, timeout=300,
    )  # fmt: skip
    return result.stdout + result.stderr


def exec_in(containerd: Containerd, container_id: str, exec_id: str, *args: str) -> str:
    result = containerd.ctr(
        "task", "exec", "--exec-id", exec_id, container_id, *args, check=False, timeout=900
    )
    if result.returncode != 0:
        why = inner_diagnosis(containerd, container_id)
        raise AssertionError(f"{' '.join(args)}: {result.stdout}{result.stderr}\ninside:\n{why}")
    return result.stdout


def test_systemd_boots_with_a_delegated_cgroup(containerd: Containerd, booted: str) -> None:
    # The cgroup namespace's root is the container's own cgroup, systemd's units below it.
    assert exec_in(containerd, booted, "cg", "cat", "/proc/1/cgroup").strip() == "0::/init.scope"
    mounts = exec_in(containerd, booted, "mounts", "findmnt", "-rno", "TARGET,FSTYPE,OPTIONS")
    table = {line.split()[0]: line.split()[1:] for line in mounts.splitlines()}
    assert table["/sys/fs/cgroup"][0] == "cgroup2" and table["/sys/fs/cgroup"][1].startswith("rw")
    assert table["/run"][0] == "tmpfs" and table["/tmp"][0] == "tmpfs"


# The nested container's output, once it has pinged the VM's gateway (or given up).
NESTED_OUTPUT = """
until docker logs kept 2>&1 | grep -q "packets transmitted"; do
    [ "$(docker inspect -f '{{.State.Running}}' kept)" = true ] || break
    sleep 1
done
docker logs kept 2>&1
"""


def test_docker_runs_a_nested_container_that_reaches_the_gateway(
    containerd: Containerd, stack: PrivateSystemd, booted: str
) -> None:
    exec_in(containerd, booted, "load", "docker", "load", "-i", NESTED_PATH)
    gateway = exec_in(containerd, booted, "route", "ip", "-4", "route", "show", "default").split()[2]
    assert gateway == BRIDGE_ADDRESS
    # One nested container (under TCG on a busy machine each start takes minutes): it prints,
    # pings the VM's gateway, and stays up while the host is searched for anything of it.
    script = f"echo ok; ping -c 1 -W 10 {gateway}; exec sleep 600"
    start = time.monotonic()
    run = ["docker", "run", "-d", "--name", "kept", NESTED_REFERENCE, "sh", "-c", script]
    nested = exec_in(containerd, booted, "run", *run).strip()
    out = exec_in(containerd, booted, "logs", "timeout", "600", "sh", "-c", NESTED_OUTPUT)
    record("nested: docker run -d busybox to its output", time.monotonic() - start)
    assert out.splitlines()[0] == "ok", out
    assert "1 packets received" in out, out
    # The nested container's network, mounts, cgroups and processes are the VM's, not the host's.
    assert "docker0" in exec_in(containerd, booted, "links", "ip", "-o", "link")
    assert "docker0" not in stack.run("ip", "-o", "link").stdout
    assert "docker" not in stack.run("findmnt", "-rno", "TARGET,SOURCE").stdout
    # Docker names the nested container's cgroup after its id (docker-<id>.scope).
    assert nested in exec_in(containerd, booted, "cgroups", "find", "/sys/fs/cgroup", "-name", f"*{nested}*")
    assert nested not in stack.run("find", "/sys/fs/cgroup").stdout
    assert host_leftovers(["dockerd", "containerd-shim-runc", "sleep 600"]) == []


def test_ctr_task_kill_halts_systemd(containerd: Containerd, booted: str) -> None:
    # ctr sends SIGTERM (the image names no stop signal); systemd gets SIGRTMIN+3 and halts.
    with containerd.events() as events:
        start = time.monotonic()
        containerd.ctr("task", "kill", booted)
        deadline = start + STOP_TIMEOUT
        while containerd.tasks().get(booted) == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.2)
        took = time.monotonic() - start
    record("system container: ctr task kill to exit", took)
    assert containerd.tasks().get(booted) == "STOPPED", f"still running after {took:.0f} s"
    # systemd's own halt exits 0; a kill would be 128+N (protobuf's JSON leaves out a zero).
    (exit_event,) = [e for topic, e in events if topic == "/tasks/exit" and e.get("container_id") == booted]
    assert exit_event.get("exit_status", 0) == 0, exit_event
    containerd.ctr("task", "rm", booted)
    containerd.ctr("containers", "rm", booted)


def test_nerdctl_stop_halts_systemd(containerd: Containerd, stack: PrivateSystemd, image: str) -> None:
    if not NERDCTL.exists():
        pytest.skip("nerdctl is not installed (tools/install-test-clients)")
    # As the README shows it: Docker's storage on a tmpfs (without one, dockerd falls back to its vfs
    # driver, whose backingFsBlockDev node is a device no writeback takes).
    containerd.nerdctl("run", "-d", "--privileged", "--runtime", RUNTIME, "--network", "none",
                       "--annotation", MEMORY, "--tmpfs", "/var/lib/docker:size=512m",
                       "--name", "sc2", image, *INIT)  # fmt: skip
    try:
        container_id = containerd.nerdctl("inspect", "-f", "{{.ID}}", "sc2").stdout.strip()
        assert is_system_running(containerd, container_id, "boot") in ("running", "degraded")
        start = time.monotonic()
        containerd.nerdctl("stop", "-t", str(int(STOP_TIMEOUT)), "sc2")
        took = time.monotonic() - start
        record("system container: nerdctl stop", took)
        # Halted by systemd itself (exit 0), not killed when the timeout ran out (137).
        assert containerd.nerdctl("inspect", "-f", "{{.State.ExitCode}}", "sc2").stdout.strip() == "0"
        assert took < STOP_TIMEOUT
    finally:
        containerd.nerdctl("rm", "-f", "sc2", check=False)
        stack.run("sh", "-c", "rm -rf /run/containerd/fifo/*")
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print("\n" + "\n".join(f"{name}: {seconds:.1f} s" for name, seconds in TIMINGS.items()))
