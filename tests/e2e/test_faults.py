"""Faults a user's host will see, each with what the user must get: a guest
that stops answering (its QEMU SIGSTOPped) fails `ctr run` within the
configured deadline, with a sentence naming the VM and the step, and the VM
is cleaned up; a QEMU killed by SIGKILL, or a guest kernel that panics, ends
the task with an exit status that spinboxd's journal line about the VM
explains, and leaves nothing behind; a VM whose scope reaches its MemoryMax
gives TaskOOM before the exit (only where cgroup2 offers the memory
controller: elsewhere the limit is never enforced)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spinbox import statefile
from spinbox.vmid import vm_id_for
from tests.e2e.stack import (
    BUILDS,
    CRICTL,
    IMAGE,
    NOTHING_LEFT,
    RUNTIME,
    Containerd,
    CriContainerd,
    task_topics,
    wait_until_clean,
)
from tests.e2e.test_cri_pods import wait_clean
from tests.e2e.test_network import NO_NETWORK_LEFT, network_leftovers
from tests.harness.systemd import PrivateSystemd
from tests.integration.daemon.spinboxd import PYTHON, TOP

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


def qemu_pid(stack: PrivateSystemd, vm_id: str) -> int:
    """QEMU's pid from the VM's state file (0 until QEMU answers QMP)."""
    state = stack.path(f"/run/spinbox/vm/{vm_id}/{statefile.FILE}")
    with contextlib.suppress(OSError, ValueError):
        return int((statefile.read_section(state, statefile.DAEMON) or {}).get("pid", 0))
    return 0


def vm_lines(stack: PrivateSystemd, vm_id: str) -> list[str]:
    """spinboxd's journal lines about one VM."""
    journal = stack.journal("-u", "spinbox.service", "-o", "cat")
    return [line for line in journal.splitlines() if f"VM {vm_id}:" in line or f"VM {vm_id} " in line]


def run_until_qemu_ends(
    containerd: Containerd, stack: PrivateSystemd, name: str, end: Callable[[int], object]
) -> tuple[subprocess.Popen[str], int, str]:
    """`ctr run --rm` of a `sleep` whose VM's QEMU (pid given to `end`) is then ended from outside;
    returns the run, QEMU's pid and ctr's stderr."""
    run = subprocess.Popen(
        containerd.ctr_argv("run", "--rm", "--runtime", RUNTIME, IMAGE, name, "sleep", "600"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stack.wait_for(f"task {name} to run", lambda: containerd.tasks().get(name) == "RUNNING", timeout=300)
        pid = qemu_pid(stack, f"default-{name}")
        assert pid
        end(pid)
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    return run, pid, stderr


def test_a_qemu_killed_by_sigkill_ends_the_task_with_the_status_the_journal_explains(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    name, vm_id = "qkill1", "default-qkill1"
    with containerd.events() as events:
        run, pid, stderr = run_until_qemu_ends(
            containerd, stack, name, lambda pid: stack.run("kill", "-KILL", str(pid))
        )
    # The status is the one spinboxd's line about the VM gives, and that line says why.
    said = (
        f"VM {vm_id}: QEMU was killed by SIGKILL, not by spinbox (QEMU pid {pid}); "
        "the processes in it end with exit status 137"
    )
    assert run.returncode == 137, stderr
    assert said in vm_lines(stack, vm_id), vm_lines(stack, vm_id)
    assert said in stack.journal("-u", f"spinbox-vm-{vm_id}.scope", "-o", "cat")
    # Someone's SIGKILL is no OOM: containerd hears only the exit.
    topics = task_topics(events, name)
    assert "/tasks/exit" in topics and "/tasks/oom" not in topics, topics
    containerd.ctr("container", "delete", name, check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_a_guest_kernel_panic_ends_the_task_with_the_reason_in_the_journal(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    name, vm_id = "panic1", "default-panic1"
    result = containerd.ctr(
        "run", "--rm", "--privileged", "--runtime", RUNTIME, IMAGE, name,
        "sh", "-c", "echo c > /proc/sysrq-trigger; sleep 600",
        check=False, timeout=600,
    )  # fmt: skip
    # A panic gives the processes no status of their own: 255, containerd's "unknown", and the reason.
    assert result.returncode == 255, result.stderr
    lines = vm_lines(stack, vm_id)
    assert any(
        "the guest kernel panicked" in line and "end with exit status 255" in line for line in lines
    ), lines
    console = stack.journal("-u", f"spinbox-vm-{vm_id}.scope", "-o", "cat")
    assert "Kernel panic" in console and "the guest kernel panicked" in console, console[-3000:]
    containerd.ctr("container", "delete", name, check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def memory_controller_missing(stack: PrivateSystemd) -> str:
    """Why the test systemd's scopes cannot reach a MemoryMax ("" where they can)."""
    try:
        offered = stack.path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    except OSError as e:
        return f"the test systemd's cgroup2 cannot be read: {e}"
    if "memory" in offered:
        return ""
    return (
        "the test systemd's cgroup2 offers no memory controller (cgroup.controllers: "
        f"{' '.join(offered) or 'none'}): a scope's MemoryMax is recorded, never enforced"
    )


def test_a_vm_scope_at_its_memory_limit_gives_taskoom_then_the_exit(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    missing = memory_controller_missing(stack)
    if missing:
        pytest.skip(missing)
    name, vm_id = "scopeoom1", "default-scopeoom1"
    scope = f"spinbox-vm-{vm_id}.scope"
    with containerd.events() as events:
        # Below what QEMU holds: writing memory.max reclaims what it can, then the kernel's
        # OOM killer ends the scope's biggest process, QEMU.
        run, pid, stderr = run_until_qemu_ends(
            containerd,
            stack,
            name,
            lambda _: stack.systemctl("set-property", "--runtime", scope, "MemoryMax=32M"),
        )
    said = (
        f"VM {vm_id}: the VM's scope reached its memory limit (MemoryMax={32 << 20} bytes) and the "
        f"kernel's OOM killer ended QEMU (SIGKILL) (QEMU pid {pid}); the processes in it end with "
        "exit status 137"
    )
    assert run.returncode == 137, stderr
    assert said in vm_lines(stack, vm_id), vm_lines(stack, vm_id)
    assert said in stack.journal("-u", scope, "-o", "cat")
    topics = task_topics(events, name)
    assert "/tasks/oom" in topics and topics.index("/tasks/oom") < topics.index("/tasks/exit"), topics
    containerd.ctr("container", "delete", name, check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


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


def test_storage_kept_from_a_crash_moves_aside_for_a_container_of_the_same_name(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    # The host crashed while container reuse1 ran: its storage, with no VM state in /run, is kept.
    storage = "/var/lib/spinbox/vms/default-reuse1"
    stack.write_file(f"{storage}/rootfs-reuse1/upper.img", "the user's data\n")
    stack.systemctl("restart", "spinbox.service")
    moved: list[Path] = []
    try:
        result = containerd.ctr(
            "run", "--rm", "--runtime", RUNTIME, IMAGE, "reuse1", "echo", "ran", check=False
        )  # fmt: skip
        assert (result.returncode, result.stdout) == (0, "ran\n"), result.stderr
        moved[:] = list(stack.path("/var/lib/spinbox/vms").glob("default-reuse1.kept-*"))
        assert len(moved) == 1, moved
        assert (moved[0] / "rootfs-reuse1/upper.img").read_text() == "the user's data\n"
        aside = f"/var/lib/spinbox/vms/{moved[0].name}"
        said = (
            f"{aside}: moved aside from {storage} for a new VM default-reuse1: storage of VM default-reuse1"
        )
        journal = stack.journal("-u", "spinbox.service", "-o", "cat")
        assert said in journal, [line for line in journal.splitlines() if "reuse1" in line]
        check = stack.run("env", f"PYTHONPATH={TOP}", str(PYTHON), "-m", "spinbox.cli", "check", check=False)
        assert said in check.stdout, check.stdout
        assert wait_until_clean(stack, containerd) == NOTHING_LEFT
        assert not stack.path(storage).exists()
    finally:
        stack.run("sh", "-c", f"rm -rf {storage} {storage}.kept-*")
        # spinboxd forgets it only at its next start.
        stack.systemctl("restart", "spinbox.service")


def vm_phase(stack: PrivateSystemd, vm_id: str) -> str:
    state = stack.path(f"/run/spinbox/vm/{vm_id}/{statefile.FILE}")
    with contextlib.suppress(OSError, ValueError):
        return str((statefile.read_section(state, statefile.DAEMON) or {}).get("phase", ""))
    return ""


def kill_spinboxd(stack: PrivateSystemd) -> None:
    """SIGKILL spinboxd (not its VMs) and wait until systemd has started it again."""
    started = stack.unit_property("spinbox.service", "ExecMainStartTimestampMonotonic")
    stack.systemctl("kill", "--kill-who=main", "--signal=KILL", "spinbox.service")
    stack.wait_for(
        "spinboxd restarted",
        lambda: (
            stack.unit_property("spinbox.service", "ExecMainStartTimestampMonotonic") != started
            and stack.unit_property("spinbox.service", "ActiveState") == "active"
        ),
        timeout=120,
    )


@pytest.mark.long  # make faults: a spinboxd or containerd restart, or a helper VM
def test_spinboxd_killed_during_a_create_undoes_the_half_made_vm(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    name, vm_id = "sdcreate1", "default-sdcreate1"
    run = subprocess.Popen(
        containerd.ctr_argv("run", "--rm", "--runtime", RUNTIME, IMAGE, name, "echo", "ran"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # QEMU runs and the guest boots: the VM is half made.
        stack.wait_for(
            f"QEMU of VM {vm_id}",
            lambda: vm_phase(stack, vm_id) == "creating" and qemu_pid(stack, vm_id) > 0,
            timeout=300,
            interval=0.05,
        )
        kill_spinboxd(stack)
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    # The shim's CreateVM fails with a sentence (or, had spinboxd answered first, the container ran).
    if run.returncode == 0:
        assert stdout == "ran\n"
    else:
        assert "spinboxd" in stderr and "Traceback" not in stderr, stderr
    lines = vm_lines(stack, vm_id)
    assert any(f"cleaning up VM {vm_id} left creating by a previous spinboxd" in line for line in lines) or (
        run.returncode == 0
    ), lines
    containerd.ctr("container", "delete", name, check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
    assert network_leftovers(stack) == NO_NETWORK_LEFT
    assert not stack.path(f"/var/lib/spinbox/vms/{vm_id}").exists()


@pytest.mark.long  # make faults: a spinboxd or containerd restart, or a helper VM
def test_spinboxd_killed_during_a_stop_finishes_it_and_writes_the_layer_back(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    name, vm_id = "sdstop1", "default-sdstop1"
    containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, name, "sh", "-c", "echo kept > /data; sleep 600")
    try:
        stack.wait_for(f"task {name} to run", lambda: containerd.tasks().get(name) == "RUNNING", timeout=300)
        checks = iter(range(1000))

        def written() -> bool:
            read = containerd.ctr(
                "task", "exec", "--exec-id", f"chk{next(checks)}", name, "cat", "/data", check=False
            )
            return read.stdout == "kept\n"

        # Written in the guest (its page cache), never synced: the stop is what must save it.
        stack.wait_for(f"{name} to write /data", written, timeout=120)
        containerd.ctr("task", "kill", "-s", "KILL", name)
        stack.wait_for(f"task {name} to stop", lambda: containerd.tasks().get(name) == "STOPPED", timeout=120)
        delete = subprocess.Popen(
            containerd.ctr_argv("task", "delete", name),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            stack.wait_for(f"VM {vm_id} to stop", lambda: vm_phase(stack, vm_id) == "stopping", interval=0.02)
            kill_spinboxd(stack)
            _, stderr = delete.communicate(timeout=300)
        finally:
            if delete.poll() is None:
                delete.kill()
                delete.communicate()
        # The shim follows its stop through spinboxd's restart: the delete succeeds.
        assert delete.returncode == 0, stderr
        # The restarted spinboxd finished the stop: the layer went back into the snapshot.
        snapshot = containerd.ctr("snapshot", "mounts", "/tmp/unused", name).stdout
        assert "upperdir=" in snapshot, snapshot
        upper = snapshot.split("upperdir=")[1].split(",")[0]
        assert stack.path(f"{upper}/data").read_text() == "kept\n"
    finally:
        containerd.ctr("task", "delete", name, check=False)
        containerd.ctr("container", "delete", name, check=False)
        stack.run("sh", "-c", f"rm -rf $(dirname /run/containerd/fifo/*/{name}-stdout)", check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
    assert network_leftovers(stack) == NO_NETWORK_LEFT
    assert not stack.path(f"/var/lib/spinbox/vms/{vm_id}").exists()


@pytest.mark.long  # make faults: a spinboxd or containerd restart, or a helper VM
def test_tasks_outlive_a_containerd_restart_and_are_managed_afterwards(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    name = "ctrdrestart1"
    containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, name, "sleep", "600")
    try:
        stack.wait_for(f"task {name} to run", lambda: containerd.tasks().get(name) == "RUNNING", timeout=300)
        (shim,) = stack.processes(f"containerd-shim-spinbox-v1 .*-id {name}")
        stack.systemctl("restart", containerd.unit)
        stack.wait_for(
            f"{containerd.unit} to serve", lambda: containerd.ctr("version", check=False).returncode == 0
        )
        # The same shim and VM: the task kept running, and everything below goes through them.
        assert stack.processes(f"containerd-shim-spinbox-v1 .*-id {name}") == [shim]
        assert containerd.tasks().get(name) == "RUNNING"
        result = containerd.ctr(
            "task", "exec", "--exec-id", "after1", name, "echo", "still here", check=False
        )
        assert (result.returncode, result.stdout) == (0, "still here\n"), result.stderr
        containerd.ctr("task", "kill", "-s", "KILL", name)
        stack.wait_for(f"task {name} to stop", lambda: containerd.tasks().get(name) == "STOPPED", timeout=120)
        containerd.ctr("task", "delete", name)
    finally:
        containerd.ctr("task", "delete", name, check=False)
        containerd.ctr("container", "delete", name, check=False)
        stack.run("sh", "-c", f"rm -rf $(dirname /run/containerd/fifo/*/{name}-stdout)", check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_a_full_disk_during_a_create_is_a_clear_error_and_leaves_nothing(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    # Per-VM storage (the writable layer's image) goes on a file system with no room for it.
    vms = "/var/lib/spinbox/vms"
    stack.run("mkdir", "-p", vms)
    stack.run("mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "spinbox-e2e-full", vms)
    try:
        result = containerd.ctr(
            "run", "--rm", "--runtime", RUNTIME, IMAGE, "full1", "echo", "ran", check=False
        )
        assert result.returncode != 0
        assert f"no space left on the file system holding {vms}/default-full1" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        containerd.ctr("container", "delete", "full1", check=False)
        stack.wait_for("the VM's storage to go", lambda: not any(stack.path(vms).iterdir()))
    finally:
        stack.run("umount", vms)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
    assert network_leftovers(stack) == NO_NETWORK_LEFT
    # With room again, the same container runs: nothing of the failed one is in the way.
    result = containerd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "full1", "echo", "ran", check=False)
    assert (result.returncode, result.stdout) == (0, "ran\n"), result.stderr
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


@pytest.mark.long  # make faults: a spinboxd or containerd restart, or a helper VM
def test_a_full_disk_during_writeback_keeps_the_layer_and_the_snapshot_as_it_was(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    name, vm_id = "fullwb1", "default-fullwb1"
    containerd.ctr(
        "run", "-d", "--runtime", RUNTIME, IMAGE, name,
        "sh", "-c", "dd if=/dev/zero of=/big bs=1M count=4 && echo small > /small && sleep 600",
    )  # fmt: skip
    snapshot = containerd.ctr("snapshot", "mounts", "/tmp/unused", name).stdout
    upper = snapshot.split("upperdir=")[1].split(",")[0]
    snapshot_dir = str(Path(upper).parent)
    kept = f"/var/lib/spinbox/vms/{vm_id}"
    # The snapshot's directory (where the layer is written back, beside its upper) has no room for it.
    stack.run("mount", "-t", "tmpfs", "-o", "size=1m", "spinbox-e2e-full", snapshot_dir)
    stack.run("mkdir", "-p", upper, f"{snapshot_dir}/work")
    stack.write_file(f"{upper}/before", "the snapshot as it was\n")
    try:
        checks = iter(range(1000))

        def written() -> bool:
            read = containerd.ctr(
                "task", "exec", "--exec-id", f"chk{next(checks)}", name, "cat", "/small", check=False
            )
            return read.stdout == "small\n"

        stack.wait_for(f"{name} to write its files", written, timeout=120)
        containerd.ctr("task", "kill", "-s", "KILL", name)
        stack.wait_for(f"task {name} to stop", lambda: containerd.tasks().get(name) == "STOPPED", timeout=120)
        delete = containerd.ctr("task", "delete", name, check=False)
        # The delete says what failed and where; the snapshot is untouched; the layer is kept and named.
        assert delete.returncode != 0
        assert f"writeback of container '{name}'" in delete.stderr, delete.stderr
        assert "no space left on the file system holding" in delete.stderr, delete.stderr
        assert sorted(p.name for p in stack.path(upper).iterdir()) == ["before"]
        assert sorted(p.name for p in stack.path(snapshot_dir).iterdir()) == ["fs", "work"]
        said = f"{kept}: the writable layer of {name} (VM {vm_id}) could not be written back; kept"
        check = stack.run("env", f"PYTHONPATH={TOP}", str(PYTHON), "-m", "spinbox.cli", "check", check=False)
        assert said in check.stdout, check.stdout
        assert stack.path(f"{kept}/rootfs-{name}").is_dir()
        # The shim still has the task; once the VM is gone, its delete goes through.
        assert containerd.ctr("task", "delete", name, check=False).returncode == 0
    finally:
        containerd.ctr("task", "kill", "-s", "KILL", name, check=False)
        containerd.ctr("task", "delete", name, check=False)
        stack.run("umount", snapshot_dir, check=False)
        containerd.ctr("container", "delete", name, check=False)
        stack.run("sh", "-c", f"rm -rf $(dirname /run/containerd/fifo/*/{name}-stdout) {kept}", check=False)
        # spinboxd forgets the kept directory only at its next start.
        stack.systemctl("restart", "spinbox.service")
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
    assert network_leftovers(stack) == NO_NETWORK_LEFT


@pytest.fixture(scope="module")
def cri(stack: PrivateSystemd) -> Iterator[CriContainerd]:
    build = BUILDS["2.x"] if BUILDS["2.x"].available else BUILDS["1.6"]
    if not CRICTL.exists():
        pytest.skip("crictl is not installed (tools/install-test-clients)")
    with CriContainerd.running(stack, build) as instance:
        yield instance


@pytest.mark.long  # make faults: a spinboxd or containerd restart, or a helper VM
@pytest.mark.timeout(1200)  # a pod VM and two helper VMs under TCG
def test_a_pod_members_layer_is_written_back_after_its_pod_vms_qemu_was_killed(
    cri: CriContainerd, stack: PrivateSystemd
) -> None:
    """containerd's CRI deletes a member's task as soon as it sees it end with its VM: that
    delete's RemoveRootfs comes while spinboxd releases the VM, and must not drop the member's
    disk before a helper VM wrote it back. The member syncs its write (a QEMU killed by SIGKILL
    takes the guest's page cache with it; only what reached the disk image can be saved)."""
    logs = "/run/spinbox-e2e-podcrash"
    stack.run("mkdir", "-p", logs)
    pod_config = f"{logs}/pod.json"
    stack.write_file(
        pod_config,
        json.dumps({"metadata": {"name": "podcrash", "namespace": "default", "uid": "podcrash-uid",
                                "attempt": 0}, "log_directory": logs, "linux": {}}),
    )  # fmt: skip
    member_config = f"{logs}/writer.json"
    stack.write_file(
        member_config,
        json.dumps({"metadata": {"name": "writer"}, "image": {"image": IMAGE}, "log_path": "writer.log",
                    "command": ["sh", "-c", "echo kept > /data && sync && touch /synced; sleep 2147483647"]}),
    )  # fmt: skip
    pod = cri.crictl("runp", "--runtime", "spinbox", pod_config).stdout.strip()
    try:
        member = cri.crictl("create", pod, member_config, pod_config).stdout.strip()
        cri.crictl("start", member)
        vm_id = vm_id_for("k8s.io", pod)
        stack.wait_for(
            "the member to sync /data",
            lambda: (
                cri.crictl(
                    "exec", "-s", member, "sh", "-c", "test -e /synced && cat /data", check=False
                ).stdout.strip()
                == "kept"
            ),
            timeout=120,
        )
        mounts = cri.ctr("-n", "k8s.io", "snapshot", "mounts", "/tmp/unused", member).stdout
        upper = mounts.split("upperdir=")[1].split(",")[0]
        assert not stack.path(f"{upper}/data").exists()
        pid = qemu_pid(stack, vm_id)
        assert pid
        stack.run("kill", "-KILL", str(pid))
        # CRI deletes the member's task on its own; the release writes the layer into the snapshot.
        stack.wait_for(
            "the member's layer in its snapshot",
            lambda: (
                stack.path(f"{upper}/data").exists() and stack.path(f"{upper}/data").read_text() == "kept\n"
            ),
            timeout=600,
        )
        cri.crictl("stop", member)
        cri.crictl("rm", member)
        lines = vm_lines(stack, vm_id)
        print("\n".join(line for line in lines if member in line or "QEMU was killed" in line))
        assert any(f"the writable layer of container {member} was written back by a helper VM" in line
                   for line in lines), lines  # fmt: skip
        assert not [line for line in lines if "does not exist" in line or "not written back" in line], lines
    finally:
        cri.crictl("stopp", pod, check=False)
        cri.crictl("rmp", pod, check=False)
    wait_clean(stack, cri)
    assert network_leftovers(stack) == NO_NETWORK_LEFT
    assert not stack.path(f"/var/lib/spinbox/vms/{vm_id}").exists()
