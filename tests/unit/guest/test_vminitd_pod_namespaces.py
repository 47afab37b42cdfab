"""A pod's containers join its sandbox's IPC, UTS and PID namespaces inside the VM:
the paths containerd writes name the pause container's init process in the guest,
and vminitd joins nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guest.vminitd import validate
from guest.vminitd.config import RuntimeConfig
from guest.vminitd.spec import prepare_spec

SANDBOX_PID = 57


def prepare(
    tmp_path: Path, namespaces: list[dict[str, str]], inits: dict[int, str], sandbox: str = ""
) -> dict[str, Any]:
    config = RuntimeConfig(state_dir=tmp_path / "state", rootfs_dir=tmp_path / "rootfs")
    doc: dict[str, Any] = {"process": {"args": ["top"]}, "linux": {"namespaces": namespaces}}
    if sandbox:
        doc["annotations"] = {"io.kubernetes.cri.sandbox-id": sandbox}
    prepare_spec(config, "app", doc, tmp_path / "rootfs" / "app", terminal=False, inits=inits)
    return doc


def cri_container(pid: int = SANDBOX_PID) -> list[dict[str, str]]:
    return [
        {"type": "pid", "path": f"/proc/{pid}/ns/pid"},
        {"type": "ipc", "path": f"/proc/{pid}/ns/ipc"},
        {"type": "uts", "path": f"/proc/{pid}/ns/uts"},
        {"type": "mount"},
        {"type": "network", "path": "/var/run/netns/cni-0b1c"},
    ]


def test_a_pod_container_joins_the_sandbox_namespaces_in_the_vm(tmp_path: Path) -> None:
    doc = prepare(tmp_path, cri_container(), {SANDBOX_PID: "pause", 80: "other"})
    assert doc["linux"]["namespaces"] == [
        {"type": "pid", "path": f"/proc/{SANDBOX_PID}/ns/pid"},
        {"type": "ipc", "path": f"/proc/{SANDBOX_PID}/ns/ipc"},
        {"type": "uts", "path": f"/proc/{SANDBOX_PID}/ns/uts"},
        {"type": "mount"},
    ]


def test_the_vms_host_pid_in_a_cri_path_means_the_pods_sandbox(tmp_path: Path) -> None:
    host_pid = 80  # the VM's pid on the host, which is another container's in the guest
    doc = prepare(tmp_path, cri_container(host_pid), {SANDBOX_PID: "pause", 80: "other"}, sandbox="pause")
    assert [ns.get("path") for ns in doc["linux"]["namespaces"]] == [
        f"/proc/{SANDBOX_PID}/ns/pid",
        f"/proc/{SANDBOX_PID}/ns/ipc",
        f"/proc/{SANDBOX_PID}/ns/uts",
        None,
    ]


def test_a_sandbox_gets_new_namespaces_and_the_vm_network(tmp_path: Path) -> None:
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    doc = prepare(tmp_path, [*namespaces, {"type": "network", "path": "/var/run/netns/cni-0b1c"}], {})
    assert doc["linux"]["namespaces"] == namespaces


@pytest.mark.parametrize(
    ("namespace", "message"),
    [
        ({"type": "pid", "path": "/proc/1/ns/pid"}, "names no running container of this VM"),
        ({"type": "ipc", "path": f"/proc/{SANDBOX_PID}/ns/pid"}, "is not /proc/<pid>/ns/ipc"),
        ({"type": "uts", "path": f"/proc/{SANDBOX_PID}/ns/uts/../../1/ns/uts"}, "is not /proc/<pid>/ns/uts"),
        ({"type": "pid", "path": "/run/netns/host-pid"}, "host namespaces do not exist inside the VM"),
        (
            {"type": "mount", "path": f"/proc/{SANDBOX_PID}/ns/mnt"},
            "shares only the ipc, pid, uts namespaces",
        ),
    ],
)
def test_a_namespace_path_that_is_no_container_of_the_vm_is_refused(
    tmp_path: Path, namespace: dict[str, str], message: str
) -> None:
    with pytest.raises(validate.InvalidRequest, match=message):
        prepare(tmp_path, [namespace], {SANDBOX_PID: "pause"})


def test_the_sandbox_having_exited_is_refused(tmp_path: Path) -> None:
    with pytest.raises(validate.InvalidRequest, match="its pod's sandbox has exited"):
        prepare(tmp_path, cri_container(4242), {80: "other"}, sandbox="pause")
