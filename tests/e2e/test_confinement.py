"""Confinement on both sides of the VM, with real containerd: the container in the guest keeps
exactly its spec's confinement, and the QEMU running it is unprivileged and sandboxed."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from spinbox.shim.spinboxd import vm_id_for
from tests.e2e.stack import BUILDS, IMAGE, NOTHING_LEFT, RUNTIME, Containerd, wait_until_clean
from tests.harness.systemd import PrivateSystemd

# Linux capability numbers (include/uapi/linux/capability.h).
CAPABILITIES = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
]  # fmt: skip
SLEEP = ["sh", "-c", "exec sleep 3600"]
# Run inside the container (as an exec, in its namespaces): what its init (pid 1) runs with,
# each masked path's content, and the mount table.
INSPECT = """
cat /proc/1/status
echo ==masked
for p in "$@"; do
  if [ -d "$p" ]; then echo "$p dir $(ls -A "$p" | wc -l)";
  elif [ -e "$p" ]; then echo "$p file $(head -c 4096 "$p" 2>/dev/null | wc -c)";
  else echo "$p absent"; fi
done
echo ==mounts
cat /proc/1/mountinfo
"""


@pytest.fixture(scope="module", params=sorted(BUILDS), ids=lambda name: f"containerd-{name}")
def containerd(request: pytest.FixtureRequest, stack: PrivateSystemd) -> Iterator[Containerd]:
    build = BUILDS[request.param]
    if not build.available:
        pytest.skip(f"containerd {build.name} is not installed (tools/install-test-clients)")
    with Containerd.running(stack, build) as instance:
        yield instance


def capability_mask(names: list[str]) -> int:
    return sum(1 << CAPABILITIES.index(name.removeprefix("CAP_")) for name in names)


def inspect(containerd: Containerd, container_id: str, masked: list[str]) -> dict[str, Any]:
    """The container's init's /proc status fields, its masked paths' contents and its mounts."""
    result = containerd.ctr(
        "task", "exec", "--exec-id", "inspect", container_id, "sh", "-c", INSPECT, "inspect", *masked
    )
    status, rest = result.stdout.split("==masked\n")
    masked_part, mounts = rest.split("==mounts\n")
    fields = {k: v.strip() for k, _, v in (line.partition(":") for line in status.splitlines())}
    # mountinfo: id parent major:minor root mount-point options ...
    mount_options = {line.split()[4]: line.split()[5] for line in mounts.splitlines() if line.strip()}
    return {"status": fields, "masked": masked_part.splitlines(), "mounts": mount_options}


def capabilities_after_exec(process: dict[str, Any]) -> dict[str, int]:
    """The capability sets of the container's program once it runs: the spec's sets, as execve
    (of a file without file capabilities) leaves them. root gets its bounding and inheritable
    sets as permitted and effective; any other user keeps its ambient set only."""
    sets = {name: capability_mask(names) for name, names in (process.get("capabilities") or {}).items()}
    bounding, inheritable, ambient = (sets.get(name, 0) for name in ("bounding", "inheritable", "ambient"))
    if (process.get("user") or {}).get("uid", 0) == 0:
        permitted = bounding | inheritable
        return {"CapBnd": bounding, "CapInh": inheritable, "CapPrm": permitted, "CapEff": permitted}
    return {"CapBnd": bounding, "CapInh": inheritable, "CapPrm": ambient, "CapEff": ambient}


def assert_spec_honoured(spec: dict[str, Any], seen: dict[str, Any]) -> None:
    process = spec["process"]
    status = seen["status"]
    shown = {name: int(status[name], 16) for name in ("CapBnd", "CapInh", "CapPrm", "CapEff")}
    assert shown == capabilities_after_exec(process)
    assert status["Seccomp"] == ("2" if (spec.get("linux") or {}).get("seccomp") else "0")
    assert status["NoNewPrivs"] == ("1" if process.get("noNewPrivileges") else "0")
    user = process.get("user") or {}
    assert status["Uid"].split() == [str(user.get("uid", 0))] * 4
    assert status["Gid"].split() == [str(user.get("gid", 0))] * 4
    for line in seen["masked"]:
        path, kind, *count = line.split()
        assert kind == "absent" or count == ["0"], f"masked path {path} shows content: {line}"
    linux = spec.get("linux") or {}
    assert len(seen["masked"]) == len(linux.get("maskedPaths") or [])
    for path in linux.get("readonlyPaths") or []:
        if path in seen["mounts"]:
            assert "ro" in seen["mounts"][path].split(","), f"{path} is not read-only"
    assert any(path in seen["mounts"] for path in linux.get("readonlyPaths") or [])
    root_ro = "ro" in seen["mounts"]["/"].split(",")
    assert root_ro == bool((spec.get("root") or {}).get("readonly"))


def container_spec(containerd: Containerd, container_id: str) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(containerd.ctr("containers", "info", container_id).stdout)["Spec"]
    return spec


def status_of(stack: PrivateSystemd, pid: int) -> dict[str, str]:
    lines = stack.path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def qemu_of(stack: PrivateSystemd, container_id: str) -> int:
    (pid,) = stack.processes(f"process=spinbox-vm-{vm_id_for('default', container_id)} ")
    return pid


def disk_of(stack: PrivateSystemd, pid: int) -> tuple[int, str]:
    """A writable disk image QEMU holds open: its descriptor and its path."""
    fds = stack.path(f"/proc/{pid}/fd")
    for entry in sorted(os.listdir(fds), key=int):
        target = os.readlink(fds / entry)
        if target.startswith("/var/lib/spinbox/") and not target.endswith(".erofs"):
            return int(entry), target
    raise AssertionError(f"QEMU {pid} holds no writable disk image under /var/lib/spinbox")


def test_default_spec_is_honoured_and_qemu_is_confined(containerd: Containerd, stack: PrivateSystemd) -> None:
    # Two containers as `ctr run` makes them with no options: two VMs.
    ids = [f"conf-{containerd.build.name.replace('.', '')}-{n}" for n in "ab"]
    try:
        # Both VMs boot at once: under TCG a boot takes long on a loaded machine.
        with ThreadPoolExecutor() as pool:
            started = pool.map(
                lambda container_id: containerd.ctr(
                    "run", "-d", "--runtime", RUNTIME, IMAGE, container_id, *SLEEP
                ),
                ids,
            )
            assert [result.returncode for result in started] == [0, 0]
        spec = container_spec(containerd, ids[0])
        assert_spec_honoured(spec, inspect(containerd, ids[0], spec["linux"].get("maskedPaths") or []))

        # While the containers run: each QEMU is unprivileged and under seccomp ...
        pids = [qemu_of(stack, container_id) for container_id in ids]
        users = []
        for pid in pids:
            status = status_of(stack, pid)
            uid, gid = status["Uid"].split()[0], status["Gid"].split()[0]
            assert uid != "0" and gid != "0"
            assert status["Seccomp"] == "2"
            assert int(status["CapEff"], 16) == 0
            users.append((uid, gid))
        assert users[0] != users[1]
        # ... and, as the first QEMU's user, the second VM's disk cannot be opened,
        # neither by its path nor through the second QEMU's descriptor.
        fd, disk = disk_of(stack, pids[1])
        uid, gid = users[0]
        for path in (disk, f"/proc/{pids[1]}/fd/{fd}"):
            tried = stack.run(
                "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                "head", "-c", "1", path, check=False,
            )  # fmt: skip
            assert tried.returncode != 0 and "Permission denied" in tried.stderr, (path, tried)
    finally:
        for container_id in ids:
            containerd.ctr("task", "kill", "-s", "SIGKILL", container_id, check=False)
            containerd.ctr("task", "delete", "-f", container_id, check=False)
            containerd.ctr("containers", "delete", container_id, check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_a_custom_confinement_is_honoured(containerd: Containerd, stack: PrivateSystemd) -> None:
    if containerd.build.name == "1.6":
        pytest.skip("ctr 1.6 has no --user")
    container_id = "conf-custom"
    options = [
        "--user", "1000:1000",
        "--seccomp",
        "--read-only",
        "--cap-drop", "CAP_NET_RAW",
        "--cap-drop", "CAP_CHOWN",
        "--cap-add", "CAP_SYS_PTRACE",
    ]  # fmt: skip
    try:
        containerd.ctr("run", "-d", "--runtime", RUNTIME, *options, IMAGE, container_id, *SLEEP)
        spec = container_spec(containerd, container_id)
        bounding = spec["process"]["capabilities"]["bounding"]
        assert "CAP_SYS_PTRACE" in bounding and "CAP_CHOWN" not in bounding
        assert spec["linux"]["seccomp"] and spec["root"]["readonly"]
        seen = inspect(containerd, container_id, spec["linux"].get("maskedPaths") or [])
        assert_spec_honoured(spec, seen)
        assert seen["status"]["Seccomp"] == "2"
        assert seen["status"]["Uid"].split()[0] == "1000"
    finally:
        containerd.ctr("task", "kill", "-s", "SIGKILL", container_id, check=False)
        containerd.ctr("task", "delete", "-f", container_id, check=False)
        containerd.ctr("containers", "delete", container_id, check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
