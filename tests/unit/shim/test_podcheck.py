"""A CRI pod or container that asks for the host's network, IPC or PID namespace, or for
mount propagation between host and container, is refused with a sentence: a VM cannot
give them, and must never silently give something else."""

from __future__ import annotations

from typing import Any

import pytest

from spinbox.shim.podcheck import PodCheckError, check_cri_spec, check_pod_namespaces

POD_NAMESPACES = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                  {"type": "network", "path": "/var/run/netns/cni-1"}]  # fmt: skip
SANDBOX = {"io.kubernetes.cri.container-type": "sandbox"}
CONTAINER = {"io.kubernetes.cri.container-type": "container"}


def spec(namespaces: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    return {"linux": {"namespaces": namespaces, **extra.pop("linux", {})}, **extra}


def without(kind: str) -> list[dict[str, str]]:
    return [ns for ns in POD_NAMESPACES if ns["type"] != kind]


def test_an_ordinary_pod_and_container_pass() -> None:
    check_cri_spec("pod", spec(POD_NAMESPACES), SANDBOX)
    mounts = [{"destination": "/etc/hosts", "type": "bind", "options": ["rbind", "rprivate", "rw"]}]
    check_cri_spec("app", spec(POD_NAMESPACES, mounts=mounts), CONTAINER)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("network", "pod sandbox 'pod' asks for the host's network \\(hostNetwork\\)"),
        ("ipc", "asks for the host's IPC namespace \\(hostIPC\\)"),
        ("pid", "asks for the host's PID namespace \\(hostPID\\)"),
    ],
)
def test_host_namespaces_are_refused(kind: str, message: str) -> None:
    with pytest.raises(PodCheckError, match=message):
        check_cri_spec("pod", spec(without(kind)), SANDBOX)


def test_a_container_of_a_host_pid_pod_is_refused() -> None:
    with pytest.raises(PodCheckError, match="container 'app' asks for the host's PID namespace"):
        check_cri_spec("app", spec(without("pid")), CONTAINER)


@pytest.mark.parametrize("propagation", ["rshared", "rslave"])
def test_propagating_mounts_are_refused(propagation: str) -> None:
    mounts = [{"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind", propagation]}]
    with pytest.raises(PodCheckError, match=f"mounts '/data' with {propagation} propagation"):
        check_cri_spec("app", spec(POD_NAMESPACES, mounts=mounts), CONTAINER)
    with pytest.raises(PodCheckError, match=f"asks for {propagation} mount propagation"):
        check_cri_spec("app", spec(POD_NAMESPACES, linux={"rootfsPropagation": propagation}), CONTAINER)


def test_a_container_outside_kubernetes_is_not_checked() -> None:
    check_cri_spec("ctr-host-net", spec(without("network")), {})


def test_a_pod_container_joins_only_its_sandboxs_namespaces() -> None:
    joined = [{"type": t, "path": f"/proc/4242/ns/{t}"} for t in ("pid", "ipc", "uts")]
    check_pod_namespaces("app", spec([*joined, {"type": "network", "path": "/run/netns/cni-1"}]), 4242)
    with pytest.raises(PodCheckError, match="joins the pid namespace '/proc/1/ns/pid', which is not its pod"):
        check_pod_namespaces("app", spec([{"type": "pid", "path": "/proc/1/ns/pid"}]), 4242)
