"""Resizing a running container's VM: nerdctl update (containerd's Task Update, which
ctr has no command for) and the CRI's UpdateContainerResources (crictl update). The
guest's MemTotal and nproc, the container's cgroup limits and the VM scope's limits all
follow; a size the VM cannot take is refused with a sentence and changes nothing.
One containerd (2.x where installed) and two VMs: a container's and a pod's."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from spinbox.vmid import vm_id_for
from tests.e2e.stack import BUILDS, CRICTL, IMAGE, NERDCTL, RUNTIME, CriContainerd
from tests.e2e.test_cri_pods import WORK, container_config, write_json
from tests.harness.fixtures import artifacts_dir
from tests.harness.oci import build_image
from tests.harness.systemd import PrivateSystemd

MIB = 1024 * 1024
OVERHEAD_MIB = 256  # vm.memory_overhead_mib's default: the scope's MemoryMax is guest memory + this
BOOT_MIB = 512  # vm.memory_mib's default
GUEST_OVERHEAD_MIB = 128  # spinbox.shim.sizing: a container's own VM has its limit + this


@pytest.fixture(scope="module")
def cri(stack: PrivateSystemd) -> Iterator[CriContainerd]:
    build = next((BUILDS[n] for n in ("2.x", "1.6") if BUILDS[n].available), None)
    if build is None or not CRICTL.exists():
        pytest.skip("containerd or crictl is not installed (tools/install-test-clients)")
    if not NERDCTL.exists():
        pytest.skip("nerdctl is not installed (tools/install-test-clients)")
    with CriContainerd.running(stack, build) as instance:
        # nerdctl uses the default namespace; the CRI imported the image into k8s.io.
        instance.ctr("images", "import", str(build_image(artifacts_dir() / "images" / "busybox.tar")))
        yield instance


def scope_limits(systemd: PrivateSystemd, vm_id: str) -> tuple[int, str]:
    scope = f"spinbox-vm-{vm_id}.scope"
    out = systemd.run("systemctl", "show", "-p", "MemoryMax,CPUQuotaPerSecUSec", scope).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return int(values["MemoryMax"]), values["CPUQuotaPerSecUSec"]


def guest_view(run: object, *prefix: str) -> tuple[int, int, str, str]:
    """MemTotal in KiB, nproc, and the container's memory.max and cpu.max, as seen inside."""
    script = "grep MemTotal /proc/meminfo; nproc; cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max"
    out = run(*prefix, "sh", "-c", script).stdout.split("\n")  # type: ignore[operator]
    return int(out[0].split()[1]), int(out[1]), out[2].strip(), out[3].strip()


def test_update_resizes_a_containers_vm(cri: CriContainerd, systemd: PrivateSystemd) -> None:
    # nerdctl's spec mounts the container's cgroup at /sys/fs/cgroup (ctr's has no such mount).
    name = "resize1"
    container_id = cri.nerdctl(
        "run", "-d", "--runtime", RUNTIME, "--network", "none", "--name", name, IMAGE, "sleep", "2147483647"
    ).stdout.strip()  # fmt: skip
    vm_id = vm_id_for("default", container_id)

    def view() -> tuple[int, int, str, str]:
        return guest_view(lambda *a: cri.nerdctl("exec", name, *a))

    try:
        boot_total, cpus, memory_max, cpu_max = view()
        assert (cpus, memory_max, cpu_max) == (1, "max", "max 100000")
        assert scope_limits(systemd, vm_id) == ((BOOT_MIB + OVERHEAD_MIB) * MIB, "1s")

        started = time.monotonic()
        cri.nerdctl(
            "update",
            "--memory",
            "1g",
            "--memory-swap",
            "1g",
            "--cpu-quota",
            "200000",
            "--cpu-period",
            "100000",
            name,
        )
        grow = time.monotonic() - started
        total, cpus, memory_max, cpu_max = view()
        vm_mib = 1024 + GUEST_OVERHEAD_MIB
        assert total - boot_total == (vm_mib - BOOT_MIB) * 1024
        assert (cpus, memory_max, cpu_max) == (2, str(1024 * MIB), "200000 100000")
        assert scope_limits(systemd, vm_id) == ((vm_mib + OVERHEAD_MIB) * MIB, "2s")

        # Beyond what the host has: refused with a sentence, and nothing changes.
        refused = cri.nerdctl("update", "--memory", "100000g", "--memory-swap", "100000g", name, check=False)
        assert refused.returncode != 0
        assert "at most" in refused.stderr and "MiB of memory" in refused.stderr, refused.stderr
        assert view() == (total, 2, str(1024 * MIB), "200000 100000")
        assert scope_limits(systemd, vm_id) == ((vm_mib + OVERHEAD_MIB) * MIB, "2s")

        started = time.monotonic()
        cri.nerdctl(
            "update",
            "--memory",
            "256m",
            "--memory-swap",
            "256m",
            "--cpu-quota",
            "100000",
            "--cpu-period",
            "100000",
            name,
        )
        shrink = time.monotonic() - started
        total, cpus, memory_max, cpu_max = view()
        # The memory goes back; the vCPU stays plugged (vCPUs are never unplugged), held to one
        # CPU's time by the scope and the container's cpu.max.
        assert (total, cpus, memory_max, cpu_max) == (boot_total, 2, str(256 * MIB), "100000 100000")
        assert scope_limits(systemd, vm_id) == ((BOOT_MIB + OVERHEAD_MIB) * MIB, "1s")
        print(f"nerdctl update: grow {grow:.2f} s, shrink {shrink:.2f} s")
    finally:
        cri.nerdctl("rm", "-f", name, check=False)


def test_a_pods_vm_grows_with_its_containers_and_crictl_update(
    cri: CriContainerd, systemd: PrivateSystemd
) -> None:
    logs = f"{WORK}/resize-logs"
    systemd.run("mkdir", "-p", logs)
    pod_config = write_json(
        systemd,
        "resize-pod.json",
        {"metadata": {"name": "resize", "namespace": "default", "uid": "resize-uid", "attempt": 0},
         "log_directory": logs, "linux": {}},
    )  # fmt: skip
    config = container_config("grower", "sleep", "2147483647")
    config["linux"] = {
        "resources": {"memory_limit_in_bytes": 256 * MIB, "cpu_quota": 100000, "cpu_period": 100000}
    }
    container_path = write_json(systemd, "resize-container.json", config)
    pod = cri.crictl("runp", "--runtime", "spinbox", pod_config).stdout.strip()
    try:
        vm_id = vm_id_for("k8s.io", pod)
        container = cri.crictl("create", pod, container_path, pod_config).stdout.strip()
        cri.crictl("start", container)

        def view() -> tuple[int, int, str, str]:
            return guest_view(lambda *a: cri.crictl("exec", "-s", container, *a))

        # The pod's VM booted at the default size and grew by the container's limits.
        total, cpus, memory_max, cpu_max = view()
        assert (cpus, memory_max, cpu_max) == (2, str(256 * MIB), "100000 100000")
        assert scope_limits(systemd, vm_id) == ((BOOT_MIB + 256 + OVERHEAD_MIB) * MIB, "2s")

        cri.crictl(
            "update", "--memory", str(512 * MIB), "--cpu-quota", "200000", "--cpu-period", "100000", container
        )
        grown, cpus, memory_max, cpu_max = view()
        assert grown - total == 256 * 1024
        assert (cpus, memory_max, cpu_max) == (3, str(512 * MIB), "200000 100000")
        assert scope_limits(systemd, vm_id) == ((BOOT_MIB + 512 + OVERHEAD_MIB) * MIB, "3s")

        cri.crictl(
            "update", "--memory", str(128 * MIB), "--cpu-quota", "100000", "--cpu-period", "100000", container
        )
        shrunk, cpus, memory_max, cpu_max = view()
        assert grown - shrunk == 384 * 1024
        assert (cpus, memory_max, cpu_max) == (3, str(128 * MIB), "100000 100000")
        assert scope_limits(systemd, vm_id) == ((BOOT_MIB + 128 + OVERHEAD_MIB) * MIB, "2s")
        info = json.loads(cri.crictl("inspect", "-o", "json", container).stdout)
        assert info["status"]["state"] == "CONTAINER_RUNNING"
    finally:
        cri.crictl("stopp", pod, check=False)
        cri.crictl("rmp", "-f", pod, check=False)
