"""Kubernetes pods through containerd's CRI plugin (1.6 and 2.x) and crictl: the runtime
handler `spinbox` gives a pod one VM, and every container of the pod runs in it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from spinbox.net.portforward import RULE_COMMENT
from tests.e2e.stack import BUILDS, CRICTL, IMAGE, POD_SUBNET, CriContainerd
from tests.harness.systemd import PrivateSystemd
from tests.integration.daemon.spinboxd import CONFIG as SPINBOXD_CONFIG

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
        "shims": systemd.processes("containerd-shim-spinbox-v1"),
        "pods": cri.crictl("pods", "-q").stdout.split(),
        "containers": cri.crictl("ps", "-a", "-q").stdout.split(),
        "netns": sorted(p.name for p in systemd.path("/run/netns").glob("*")),
        # Port-forward's rules live in the pods' namespaces, never in the host's.
        "port-forward-rules": systemd.run("iptables-save", "-t", "nat").stdout.count(RULE_COMMENT),
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

    check_port_forward(cri, systemd, pod, client_id, ip)

    # A container removed from a running pod leaves the pod's VM running.
    cri.crictl("stop", "-t", "5", server_id)
    cri.crictl("rm", server_id)
    assert len(systemd.processes("qemu-system")) == 1
    assert cri.crictl("exec", "-s", client_id, "true", check=False).returncode == 0

    cri.crictl("stopp", pod)
    cri.crictl("rmp", pod)
    expected = {
        "scopes": [], "qemu": [], "vm-files": [], "vm-storage": [], "shims": [], "pods": [],
        "containers": [], "netns": [], "mounts": [], "port-forward-rules": 0,
    }  # fmt: skip
    deadline = time.monotonic() + 60
    found = pod_leftovers(systemd, cri)
    while found != expected and time.monotonic() < deadline:
        time.sleep(0.5)
        found = pod_leftovers(systemd, cri)
    assert found == expected


def pod_netns(cri: CriContainerd, pod: str) -> str:
    spec = json.loads(cri.crictl("inspectp", "-o", "json", pod).stdout)["info"]["runtimeSpec"]
    return next(str(ns["path"]) for ns in spec["linux"]["namespaces"] if ns["type"] == "network")


FETCH_MD5 = """
import hashlib, socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=120)
digest, size = hashlib.md5(), 0
while data := conn.recv(1 << 16):
    digest.update(data)
    size += len(data)
print(digest.hexdigest(), size)
"""


def check_port_forward(
    cri: CriContainerd, systemd: PrivateSystemd, pod: str, container: str, ip: str
) -> None:
    """crictl port-forward reaches a server bound to the pod's localhost in the VM (busybox
    httpd on 127.0.0.1:8081, started in `container`) and one bound to every address (the
    nc server on 8080); 8 MiB from a third server arrive whole."""
    cri.crictl(
        "exec", "-s", container, "sh", "-c",
        "mkdir -p /www && echo local > /www/index.html && httpd -p 127.0.0.1:8081 -h /www"
        " && head -c 8388608 /dev/urandom > /big"
        " && (nc -ll -p 8082 -e cat /big </dev/null >/dev/null 2>&1 &)",
    )  # fmt: skip
    big_md5 = cri.crictl("exec", "-s", container, "md5sum", "/big").stdout.split()[0]

    def big(address: str, port: int) -> float:
        # A client that never half-closes: containerd ends a forwarded connection 1 s after
        # either direction ends (as nc does at once when its stdin is empty).
        started = time.monotonic()
        fetched = systemd.run("python3", "-c", FETCH_MD5, address, str(port), timeout=300)
        assert fetched.stdout.split() == [big_md5, "8388608"], fetched
        return time.monotonic() - started

    def get(url: str) -> subprocess.CompletedProcess[str]:
        # curl: busybox-static's wget crashes on this host.
        return systemd.run("curl", "-sS", "--max-time", "30", url, check=False, timeout=60)

    # Bound to the VM's localhost only: the pod's address refuses it (curl's 7: could not connect).
    assert get(f"http://{ip}:8081/").returncode == 7
    # One redirect rule, in the pod's namespace.
    rules = systemd.run("nsenter", f"--net={pod_netns(cri, pod)}", "iptables-save", "-t", "nat").stdout
    assert rules.count(RULE_COMMENT) == 1, rules
    forward = systemd.popen(
        str(CRICTL), "--runtime-endpoint", f"unix://{cri.address}", "port-forward", pod,
        "18080:8080", "18081:8081", "18082:8082",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:

        def forwarded() -> bool:
            result = systemd.run("/bin/busybox", "nc", "-w", "30", "127.0.0.1", "18080", check=False)
            return result.stdout.strip() == "pong"

        systemd.wait_for("port-forward to the server on every address", forwarded, timeout=120)
        answer = get("http://127.0.0.1:18081/")
        assert answer.stdout.strip() == "local", answer
        through, direct = big("127.0.0.1", 18082), big(ip, 8082)
        print(f"8 MiB through port-forward {through:.1f} s, from the pod's address {direct:.1f} s")
        # spinboxd carries none of it: its restart leaves port-forward working, and the
        # new spinboxd neither drops nor repeats the rule.
        systemd.systemctl("restart", "spinbox.service")
        assert forwarded()
        rules = systemd.run("nsenter", f"--net={pod_netns(cri, pod)}", "iptables-save", "-t", "nat").stdout
        assert rules.count(RULE_COMMENT) == 1, rules
        answer = get("http://127.0.0.1:18081/")  # a new connection of the same forward
        assert answer.stdout.strip() == "local", answer
    finally:
        os.killpg(forward.pid, signal.SIGTERM)  # nsenter and crictl
        output, _ = forward.communicate(timeout=30)
        print(f"crictl port-forward: {output.decode(errors='replace').strip()}")


def wait_clean(systemd: PrivateSystemd, cri: CriContainerd) -> None:
    expected = {
        "scopes": [], "qemu": [], "vm-files": [], "vm-storage": [], "shims": [], "pods": [],
        "containers": [], "netns": [], "mounts": [], "port-forward-rules": 0,
    }  # fmt: skip
    deadline = time.monotonic() + 60
    found = pod_leftovers(systemd, cri)
    while found != expected and time.monotonic() < deadline:
        time.sleep(0.5)
        found = pod_leftovers(systemd, cri)
    assert found == expected


@pytest.mark.timeout(1800)  # one pod VM and four containers, under TCG on a loaded host
def test_a_pods_containers_share_its_uts_ipc_and_pid_namespaces(
    cri: CriContainerd, systemd: PrivateSystemd
) -> None:
    logs = f"{WORK}/logs"
    systemd.run("mkdir", "-p", logs)
    pod_config = write_json(
        systemd,
        "shared-pod.json",
        {"metadata": {"name": "shared", "namespace": "default", "uid": "shared-uid", "attempt": 0},
         "hostname": "spinpod", "log_directory": logs,
         "linux": {"sysctls": {"kernel.shm_rmid_forced": "1", "kernel.msgmax": "10000"},
                   "security_context": {"namespace_options": {"pid": 0}}}},
    )  # fmt: skip
    pod = cri.crictl("runp", "--runtime", "spinbox", pod_config).stdout.strip()
    try:

        def run(name: str, *command: str, pid_mode: int = 0) -> str:
            config = container_config(name, *command)
            config["linux"] = {"security_context": {"namespace_options": {"pid": pid_mode}}}
            container = cri.crictl("create", pod, write_json(systemd, f"{name}.json", config), pod_config)
            cri.crictl("start", container.stdout.strip())
            return container.stdout.strip()

        first = run("first", "sleep", "1000001")
        second = run("second", "sleep", "1000002")

        def exec_in(container: str, script: str) -> str:
            return cri.crictl("exec", "-s", container, "sh", "-c", script).stdout.strip()

        # UTS: the pod's hostname in every container; IPC: the pod's sysctls.
        for container in (first, second):
            assert exec_in(container, "hostname") == "spinpod"
            assert exec_in(container, "cat /proc/sys/kernel/shm_rmid_forced") == "1"
            assert exec_in(container, "cat /proc/sys/kernel/msgmax") == "10000"
        # A POSIX shared memory file made in one container is seen by the other.
        exec_in(first, "echo shared > /dev/shm/pod-ipc")
        assert exec_in(second, "cat /dev/shm/pod-ipc") == "shared"
        # PID: one namespace, whose PID 1 is the pod's sandbox; each sees the other's process.
        cmdlines = exec_in(second, "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done")
        assert "sleep 1000001" in cmdlines and "sleep 1000002" in cmdlines
        assert exec_in(first, "tr '\\0' ' ' < /proc/1/cmdline") == "tail -f /dev/null"

        def processes(container: str) -> str:
            return exec_in(container, "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done")

        # An exec past its timeout is killed (containerd's ExecSync kills it, spinbox's guest ends it).
        timed_out = cri.crictl("exec", "--timeout", "1", "-s", first, "sleep", "4321", check=False)
        assert timed_out.returncode != 0, timed_out
        assert "sleep 4321" not in processes(second)

        # A member whose first process has a child holding its stdout, stopped with timeout 0:
        # SIGKILL ends the first process, the child dies with it, and the exit comes at once;
        # in the pod's PID namespace (the sandbox is PID 1) and in one of its own
        # (NamespaceMode_CONTAINER, what a kubelet asks unless the pod shares its processes:
        # the container's own first process is PID 1).
        for name, pid_mode in (("holder-pod", 0), ("holder-own", 1)):
            child = f"sleep {1000003 + pid_mode}"
            holder = run(name, "sh", "-c", f"{child} & echo holding; wait", pid_mode=pid_mode)
            systemd.wait_for(f"{name}'s child", lambda c=holder, s=child: s in processes(c))
            assert exec_in(holder, "cat /proc/1/comm") == ("sh" if pid_mode == 1 else "tail")
            started = time.monotonic()
            cri.crictl("stop", "-t", "0", holder, timeout=120)
            print(f"stop -t 0 of {name}, whose child holds its stdout: {time.monotonic() - started:.1f} s")
            status = json.loads(cri.crictl("inspect", "-o", "json", holder).stdout)["status"]
            assert (status["state"], status["exitCode"]) == ("CONTAINER_EXITED", 137), status
            assert child not in processes(second)
            assert "holding" in systemd.path(f"{logs}/{name}.log").read_text()

        # `top` stopped right after its start: in the pod's PID namespace it is not PID 1, so
        # SIGTERM ends it at once; in one of its own, SIGTERM is dropped and the timeout's
        # SIGKILL ends it.
        for name, pid_mode, timeout, killed in (("top-pod", 0, "120", False), ("top-own", 1, "3", True)):
            top = run(name, "top", "-b", pid_mode=pid_mode)
            cri.crictl("stop", "-t", timeout, top)
            status = json.loads(cri.crictl("inspect", "-o", "json", top).stdout)["status"]
            assert status["state"] == "CONTAINER_EXITED", status
            assert (status["exitCode"] == 137) == killed, (name, status["exitCode"])

        check_restarts(cri, systemd, pod, pod_config, processes)
    finally:
        cri.crictl("stopp", pod)
        cri.crictl("rmp", pod)
    wait_clean(systemd, cri)


def check_restarts(
    cri: CriContainerd, systemd: PrivateSystemd, pod: str, pod_config: str, processes: Callable[[str], str]
) -> None:
    """A kubelet's restart of a pod's container: a new container of the same name, the next
    attempt, in the same running pod (the same VM), then the old one's removal; after the old
    one exited, and after it was stopped."""
    # A directory of this pod's own: the private systemd outlives one containerd version's run.
    empty_dir = f"{WORK}/app-empty-dir-{pod[:12]}"
    systemd.run("mkdir", empty_dir)

    def app(attempt: int, script: str) -> str:
        config = container_config("app", "sh", "-c", script)
        config["metadata"] = {"name": "app", "attempt": attempt}
        config["mounts"] = [{"container_path": "/cache", "host_path": empty_dir}]
        config["log_path"] = f"app_{attempt}.log"
        path = write_json(systemd, f"app-{attempt}.json", config)
        container = cri.crictl("create", pod, path, pod_config).stdout.strip()
        cri.crictl("start", container)
        return container

    def state(container: str) -> tuple[str, int]:
        status = json.loads(cri.crictl("inspect", "-o", "json", container).stdout)["status"]
        return status["state"], status["exitCode"]

    def in_app(container: str, script: str) -> str:
        return cri.crictl("exec", "-s", container, "sh", "-c", script).stdout.strip()

    # Attempt 0 writes to the pod's volume and to its own rootfs, and exits.
    first = app(0, "echo attempt-0 >> /cache/runs; echo mine > /own; exit 3")
    systemd.wait_for("app attempt 0 to exit", lambda: state(first) == ("CONTAINER_EXITED", 3), timeout=120)
    # Attempt 1, in the same pod VM, sees the volume and a rootfs of its own.
    second = app(1, "echo attempt-1 >> /cache/runs; exec sleep 1000005")
    assert len(systemd.processes("qemu-system")) == 1
    systemd.wait_for("app attempt 1's process", lambda: "sleep 1000005" in processes(second))
    assert in_app(second, "cat /cache/runs") == "attempt-0\nattempt-1"
    assert in_app(second, "test -e /own && echo found || echo none") == "none"
    cri.crictl("rm", first)
    assert state(second) == ("CONTAINER_RUNNING", 0)

    # Attempt 1 stopped, then replaced the same way.
    cri.crictl("stop", "-t", "30", second)
    assert state(second) == ("CONTAINER_EXITED", 143)
    third = app(2, "echo attempt-2 >> /cache/runs; exec sleep 1000006")
    assert len(systemd.processes("qemu-system")) == 1
    systemd.wait_for("app attempt 2's process", lambda: "sleep 1000006" in processes(third))
    assert in_app(third, "cat /cache/runs") == "attempt-0\nattempt-1\nattempt-2"
    cri.crictl("rm", second)
    assert state(third) == ("CONTAINER_RUNNING", 0)
    assert "sleep 1000005" not in processes(third)
    assert systemd.path(f"{empty_dir}/runs").read_text() == "attempt-0\nattempt-1\nattempt-2\n"


@pytest.mark.parametrize(
    ("option", "sentence"),
    [("network", "asks for the host's network (hostNetwork)"), ("pid", "asks for the host's PID namespace")],
)
def test_a_pod_asking_for_host_namespaces_is_refused(
    cri: CriContainerd, systemd: PrivateSystemd, option: str, sentence: str
) -> None:
    pod_config = write_json(
        systemd,
        f"host-{option}.json",
        {"metadata": {"name": f"host-{option}", "namespace": "default", "uid": option, "attempt": 0},
         "linux": {"security_context": {"namespace_options": {option: 2}}}},
    )  # fmt: skip
    result = cri.crictl("runp", "--runtime", "spinbox", pod_config, check=False)
    assert result.returncode != 0
    assert sentence in result.stderr, result.stderr
    wait_clean(systemd, cri)


def qemu_rss_mib(systemd: PrivateSystemd) -> list[float]:
    """The resident memory of every QEMU process: what each pod's VM takes on the host."""
    sizes = []
    for pid in systemd.processes("qemu-system"):
        status = systemd.run("cat", f"/proc/{pid}/status", check=False).stdout
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            sizes.append(int(match.group(1)) / 1024)
    return sizes


@pytest.mark.long  # make soak: ten VMs booting at once under TCG
@pytest.mark.timeout(3600)  # ten VMs booting at once under TCG
def test_ten_pods_at_once_with_two_containers_each(cri: CriContainerd, systemd: PrivateSystemd) -> None:
    logs = f"{WORK}/logs"
    systemd.run("mkdir", "-p", logs)
    count = 10

    def pod_config(n: int) -> str:
        return write_json(
            systemd,
            f"many-{n}.json",
            {"metadata": {"name": f"many-{n}", "namespace": "default", "uid": f"many-{n}", "attempt": 0},
             "log_directory": logs, "linux": {}},
        )  # fmt: skip

    configs = [pod_config(n) for n in range(count)]
    # Ten TCG guests booting at once on a small host share its CPUs: each may take several times
    # its lone boot before its agent answers, so the agent's deadline grows for this test.
    daemon_config = systemd.path(SPINBOXD_CONFIG).read_text()
    systemd.write_file(SPINBOXD_CONFIG, daemon_config + "boot_timeout = 900\n")
    systemd.systemctl("restart", "spinbox.service")
    app = write_json(systemd, "many-app.json", container_config("app", "sleep", "2147483647"))
    side = write_json(systemd, "many-side.json", container_config("side", "sleep", "2147483646"))

    def crictl(*args: str) -> str:
        return cri.crictl("--timeout", "900s", *args, timeout=960).stdout.strip()

    def start_pod(config: str) -> str:
        pod = crictl("runp", "--runtime", "spinbox", config)
        for container in (app, side):
            crictl("start", crictl("create", pod, container, config))
        return pod

    def remove_pod(pod: str) -> None:
        crictl("stopp", pod)
        crictl("rmp", pod)

    try:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=count) as pool:
            results = list(pool.map(lambda c: _attempt(start_pod, c), configs))
            pods = [r for r in results if isinstance(r, str)]
            try:
                assert len(pods) == count, "\n".join(str(r) for r in results if not isinstance(r, str))
                seconds = time.monotonic() - started
                print(f"{count} pods with two containers each started at once in {seconds:.1f} s")
                running = cri.crictl("ps", "-q", "--state", "Running").stdout.split()
                assert len(running) == 2 * count
                assert len(systemd.processes("qemu-system")) == count
                rss = qemu_rss_mib(systemd)
                print(f"QEMU resident memory per idle pod: min {min(rss):.0f} MiB, max {max(rss):.0f} MiB")
            finally:
                removed = list(pool.map(lambda p: _attempt(remove_pod, p), pods))
    finally:
        systemd.write_file(SPINBOXD_CONFIG, daemon_config)
        systemd.systemctl("restart", "spinbox.service")
    assert [str(r) for r in removed if isinstance(r, BaseException)] == []
    wait_clean(systemd, cri)


def _attempt(function: Callable[[str], object], argument: str) -> object:
    """The function's result or the exception it raised, so that every pod's outcome is kept."""
    try:
        return function(argument)
    except Exception as error:  # every failure is reported by the caller's assertion
        return error
