"""Host files bind-mounted into spinbox containers read as they do under runc:
`ctr run --mount` of a host file, the /etc/hosts nerdctl writes for
--add-host, and a pod's /etc/hostname, /etc/resolv.conf and termination
message file through the CRI. Each file reaches the guest through the VM's
virtio-fs share, whatever its size (test_volumes covers directories)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.e2e.stack import (
    BUILDS,
    CRICTL,
    IMAGE,
    NERDCTL,
    NOTHING_LEFT,
    RUNTIME,
    Containerd,
    CriContainerd,
    wait_until_clean,
)
from tests.harness.systemd import PrivateSystemd

# Under /etc, which is an overlay private to the test's systemd.
HOST_DIR = "/etc/spinbox-e2e-binds"
CRI_WORK = "/run/spinbox-e2e-binds"


def preferred_build() -> str:
    """containerd 2.x where installed (nerdctl needs it), else Debian's 1.6."""
    return "2.x" if BUILDS["2.x"].available else "1.6"


@pytest.fixture(scope="module")
def containerd(stack: PrivateSystemd) -> Iterator[Containerd]:
    instance = Containerd(stack, BUILDS[preferred_build()])
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def test_ctr_mount_of_a_host_file_shows_its_content_read_only(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    stack.write_file(f"{HOST_DIR}/f", "content from the host\n")
    stack.write_file(f"{HOST_DIR}/big", b"x" * (2 << 20))
    script = (
        "cat /data/f; "
        "echo changed > /data/f 2>/dev/null && echo writable || echo read-only; "
        "test -e /data/big && echo big-present || echo big-absent"
    )
    result = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME,
        "--mount", f"type=bind,src={HOST_DIR}/f,dst=/data/f,options=rbind:ro",
        "--mount", f"type=bind,src={HOST_DIR}/big,dst=/data/big,options=rbind:ro",
        IMAGE, "bind1", "sh", "-c", script,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "content from the host\nread-only\nbig-present\n"
    assert stack.path(f"{HOST_DIR}/f").read_text() == "content from the host\n"
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_nerdctl_add_host_appears_in_etc_hosts(containerd: Containerd, stack: PrivateSystemd) -> None:
    if containerd.build.name == "1.6":
        pytest.skip("nerdctl v2 needs containerd 1.7 or newer")
    if not NERDCTL.exists():
        pytest.skip("nerdctl is not installed (tools/install-test-clients)")
    result = containerd.nerdctl(
        "run", "--rm", "--runtime", RUNTIME, "--add-host", "foo:10.1.2.3", IMAGE, "cat", "/etc/hosts",
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert any(line.split() == ["10.1.2.3", "foo"] for line in result.stdout.splitlines()), result.stdout
    # nerdctl v2.1 leaves its client-side FIFOs behind, with runc as well.
    stack.run("sh", "-c", "rm -rf /run/containerd/fifo/*")
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_cri_container_sees_its_pods_hostname_dns_and_termination_message_file(stack: PrivateSystemd) -> None:
    if not CRICTL.exists():
        pytest.skip("crictl is not installed (tools/install-test-clients)")
    cri = CriContainerd(stack, BUILDS[preferred_build()])
    cri.start()
    try:
        pod_config = f"{CRI_WORK}/pod.json"
        stack.write_file(
            pod_config,
            json.dumps(
                {
                    "metadata": {"name": "binds", "namespace": "default", "uid": "binds-uid", "attempt": 0},
                    "hostname": "binds-pod",
                    "dns_config": {"servers": ["10.9.9.9"], "searches": ["example.test"]},
                    "log_directory": f"{CRI_WORK}/logs",
                    "linux": {},
                }
            ),
        )
        termination_log = f"{HOST_DIR}/termination-log"
        stack.write_file(termination_log, "", mode=0o666)
        container_config = f"{CRI_WORK}/sleeper.json"
        stack.write_file(
            container_config,
            json.dumps(
                {
                    "metadata": {"name": "sleeper"},
                    "image": {"image": IMAGE},
                    "command": ["sleep", "2147483647"],
                    # As the kubelet gives every container its termination message file.
                    "mounts": [{"container_path": "/dev/termination-log", "host_path": termination_log}],
                    "log_path": "sleeper.log",
                }
            ),
        )
        stack.run("mkdir", "-p", f"{CRI_WORK}/logs")
        pod = cri.crictl("runp", "--runtime", "spinbox", pod_config).stdout.strip()
        container = cri.crictl("create", pod, container_config, pod_config).stdout.strip()
        cri.crictl("start", container)
        result = cri.crictl(
            "exec", "-s", container, "sh", "-c",
            "cat /etc/hostname /etc/resolv.conf; stat -c %a /dev/termination-log",
            check=False,
        )  # fmt: skip
        shown = result.stdout
        assert result.returncode == 0, result.stderr
        lines = shown.strip().splitlines()
        assert lines[0] == "binds-pod", shown
        assert "nameserver 10.9.9.9" in lines and "search example.test" in lines, shown
        assert lines[-1] == "666", shown
        cri.crictl("stopp", pod)
        cri.crictl("rmp", pod)
        deadline = time.monotonic() + 60
        while stack.processes("qemu-system") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert stack.processes("qemu-system") == []
    finally:
        cri.stop()
