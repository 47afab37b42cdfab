"""Kubernetes pods through containerd's CRI plugin (1.6 and 2.x) and crictl: the runtime
handler `spinbox` gives a pod one VM, and every container of the pod runs in it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import BUILDS, CRICTL, IMAGE, POD_SUBNET, CriContainerd
from tests.harness.systemd import PrivateSystemd

WORK = "/run/spinbox-e2e-cri"


@pytest.fixture(scope="module", params=sorted(BUILDS), ids=lambda name: f"containerd-{name}")
def cri(request: pytest.FixtureRequest, stack: PrivateSystemd) -> Iterator[CriContainerd]:
    build = BUILDS[request.param]
    if not build.available or not CRICTL.exists():
        pytest.skip(f"containerd {build.name} or crictl is not installed (tools/install-test-clients)")
    with CriContainerd.running(stack, build) as instance:
        yield instance


def write_json(systemd: PrivateSystemd, name: str, value: object) -> str:
    path = f"{WORK}/{name}"
    systemd.write_file(path, json.dumps(value))
    return path


def container_config(name: str, *command: str) -> dict[str, object]:
    return {
        "metadata": {"name": name},
        "image": {"image": IMAGE},
        "command": list(command),
        "log_path": f"{name}.log",
    }


def pod_leftovers(systemd: PrivateSystemd, cri: CriContainerd) -> dict[str, object]:
    units = systemd.run("systemctl", "list-units", "--all", "--plain", "--no-legend", "spinbox-vm-*").stdout
    vm_dir = systemd.path("/run/spinbox/vm")
    return {
        "scopes": [line.split()[0] for line in units.splitlines() if line.strip()],
        "qemu": systemd.processes("qemu-system"),
        "vm-files": sorted(str(p) for p in vm_dir.rglob("*")) if vm_dir.exists() else [],
        "vm-storage": sorted(p.name for p in systemd.path("/var/lib/spinbox/vms").glob("*")),
        "shims": systemd.processes("spinbox.shim"),
        "pods": cri.crictl("pods", "-q").stdout.split(),
        "containers": cri.crictl("ps", "-a", "-q").stdout.split(),
        "netns": sorted(p.name for p in systemd.path("/run/netns").glob("*")),
        "mounts": [
            target
            for target in systemd.run("findmnt", "-rn", "-o", "TARGET").stdout.split()
            if target.startswith(("/run/spinbox/", "/var/lib/spinbox/")) or "/io.containerd." in target
        ],
    }


def test_a_pod_is_one_vm_with_all_its_containers(cri: CriContainerd, systemd: PrivateSystemd) -> None:
    logs = f"{WORK}/logs"
    systemd.run("mkdir", "-p", logs)
    pod_config = write_json(
        systemd,
        "pod.json",
        {"metadata": {"name": "web", "namespace": "default", "uid": "web-uid", "attempt": 0},
         "log_directory": logs, "linux": {}},
    )  # fmt: skip
    server = write_json(
        systemd, "server.json", container_config("server", "nc", "-ll", "-p", "8080", "-e", "echo", "pong")
    )
    client = write_json(systemd, "client.json", container_config("client", "sleep", "2147483647"))

    started = time.monotonic()
    pod = cri.crictl("runp", "--runtime", "spinbox", pod_config).stdout.strip()
    pod_seconds = time.monotonic() - started
    ids = []
    add_seconds = []
    for config in (server, client):
        started = time.monotonic()
        container = cri.crictl("create", pod, config, pod_config).stdout.strip()
        cri.crictl("start", container)
        add_seconds.append(time.monotonic() - started)
        ids.append(container)
    adds = ", ".join(f"{s:.1f} s" for s in add_seconds)
    print(f"pod start {pod_seconds:.1f} s; container create+start {adds}")
    server_id, client_id = ids

    # One VM for the pod; both containers run in it.
    assert len(systemd.processes("qemu-system")) == 1
    units = systemd.run("systemctl", "list-units", "--plain", "--no-legend", "spinbox-vm-*").stdout.split(
        "\n"
    )
    assert len([u for u in units if u.strip()]) == 1
    boot_ids = {
        cri.crictl("exec", "-s", c, "cat", "/proc/sys/kernel/random/boot_id").stdout.strip() for c in ids
    }
    assert len(boot_ids) == 1 and "" not in boot_ids
    host_boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert boot_ids != {host_boot_id}

    # The containers share the pod's network: the client reaches the server over localhost.
    def answers(*command: str) -> bool:
        return cri.crictl("exec", "-s", client_id, *command, check=False).stdout.strip() == "pong"

    systemd.wait_for("the server to answer over localhost", lambda: answers("nc", "127.0.0.1", "8080"))

    # The pod has its address from CNI and answers from the host side.
    status = json.loads(cri.crictl("inspectp", "-o", "json", pod).stdout)["status"]
    ip = status["network"]["ip"]
    assert ip.startswith(POD_SUBNET.rsplit(".", 1)[0] + ".")
    systemd.run("/bin/busybox", "ping", "-c", "1", "-W", "30", ip)
    assert systemd.run("/bin/busybox", "nc", "-w", "30", ip, "8080").stdout.strip() == "pong"

    # A container removed from a running pod leaves the pod's VM running.
    cri.crictl("stop", "-t", "5", server_id)
    cri.crictl("rm", server_id)
    assert len(systemd.processes("qemu-system")) == 1
    assert cri.crictl("exec", "-s", client_id, "true", check=False).returncode == 0

    cri.crictl("stopp", pod)
    cri.crictl("rmp", pod)
    expected = {
        "scopes": [], "qemu": [], "vm-files": [], "vm-storage": [], "shims": [], "pods": [],
        "containers": [], "netns": [], "mounts": [],
    }  # fmt: skip
    deadline = time.monotonic() + 60
    found = pod_leftovers(systemd, cri)
    while found != expected and time.monotonic() < deadline:
        time.sleep(0.5)
        found = pod_leftovers(systemd, cri)
    assert found == expected
