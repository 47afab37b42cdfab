"""Concurrent creates, round after round: four containers (or four CRI pods)
created at the same time, five rounds, on containerd 1.6 and 2.x. Every
create must finish (a hang fails within the client's deadline, with the
evidence saved) and each round must leave nothing behind: VMs, scopes,
mounts, network namespaces, TAPs, leases and iptables rules.

`make test` runs two rounds of each; `make soak` (SPINBOX_SOAK_ROUNDS=5) the
whole soak."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.e2e.stack import (
    BUILDS,
    CRICTL,
    IMAGE,
    NOTHING_LEFT,
    RUNTIME,
    Containerd,
    CriContainerd,
    wait_until_clean,
)
from tests.e2e.test_network import NO_NETWORK_LEFT, network_leftovers
from tests.harness.systemd import PrivateSystemd

AT_ONCE = 4
ROUNDS = int(os.environ.get("SPINBOX_SOAK_ROUNDS", "2"))
# One client's whole run (create, start, exit, delete) under TCG with four
# VMs booting on two cores takes well under a minute; a hang takes forever.
CLIENT_DEADLINE = 240.0
WORK = "/run/spinbox-e2e-soak"

pytestmark = pytest.mark.timeout(ROUNDS * CLIENT_DEADLINE * 2 + 120)


def iptables_rules(systemd: PrivateSystemd) -> list[str]:
    """The host's iptables rules a VM's network adds: per-VM CNI chains,
    rules about one address of spinbox's or the test pods' subnets, and
    port-forward's (which belong in the pods' own namespaces)."""
    saved = systemd.run("iptables-save", check=False).stdout.splitlines()
    per_vm = re.compile(r"CNI-[0-9a-f]{24}|\b10\.(77|88)\.\d+\.\d+/32\b|id: \"|spinbox port-forward")
    return sorted(line for line in saved if per_vm.search(line) and not line.startswith("#"))


def run_at_once(argvs: dict[str, list[str]]) -> dict[str, tuple[int | None, str]]:
    """Start every argv at once; each one's exit status (None: killed at the
    deadline) and its output."""
    started = {
        name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, argv in argvs.items()
    }
    deadline = time.monotonic() + CLIENT_DEADLINE
    results: dict[str, tuple[int | None, str]] = {}
    for name, process in started.items():
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results[name] = (process.returncode, output)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            results[name] = (None, f"still running after {CLIENT_DEADLINE:g}s\n{output}")
    return results


def failures(results: dict[str, tuple[int | None, str]]) -> str:
    """The failed runs, each with its status and the end of its output ("" if none failed)."""
    return "\n".join(
        f"{name}: exit {status}: {output.strip()[-600:]}"
        for name, (status, output) in results.items()
        if status != 0
    )


@pytest.fixture(scope="module", params=sorted(BUILDS), ids=lambda name: f"containerd-{name}")
def build_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if not BUILDS[name].available:
        pytest.skip(f"containerd {name} is not installed (tools/install-test-clients)")
    return name


def test_ctr_runs_created_at_once_finish_and_leave_nothing(build_name: str, stack: PrivateSystemd) -> None:
    with Containerd.running(stack, BUILDS[build_name]) as containerd:
        rules = iptables_rules(stack)
        for round_ in range(ROUNDS):
            names = [f"soak{round_}x{n}" for n in range(AT_ONCE)]
            started = time.monotonic()
            results = run_at_once(
                {
                    name: containerd.ctr_argv("run", "--rm", "--runtime", RUNTIME, IMAGE, name, "true")
                    for name in names
                }
            )
            print(f"round {round_}: {AT_ONCE} ctr run --rm in {time.monotonic() - started:.1f} s")
            assert not failures(results), f"round {round_}:\n{failures(results)}"
            assert wait_until_clean(stack, containerd) == NOTHING_LEFT, f"round {round_}"
            assert network_leftovers(stack) == NO_NETWORK_LEFT, f"round {round_}"
            assert iptables_rules(stack) == rules, f"round {round_}"


def pod_config(name: str) -> dict[str, object]:
    return {
        "metadata": {"name": name, "namespace": "default", "uid": f"{name}-uid", "attempt": 0},
        "log_directory": f"{WORK}/logs",
        "linux": {},
    }


@pytest.fixture(scope="module")
def cri(build_name: str, stack: PrivateSystemd) -> Iterator[CriContainerd]:
    if not CRICTL.exists():
        pytest.skip("crictl is not installed (tools/install-test-clients)")
    with CriContainerd.running(stack, BUILDS[build_name]) as instance:
        yield instance


def crictl_argv(cri: CriContainerd, *args: str) -> list[str]:
    endpoint = f"unix://{cri.address}"
    return cri.systemd.nsenter(
        str(CRICTL), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint,
        "--timeout", f"{CLIENT_DEADLINE:g}s", *args,
    )  # fmt: skip


def cri_leftovers(systemd: PrivateSystemd, cri: CriContainerd) -> dict[str, object]:
    units = systemd.run("systemctl", "list-units", "--all", "--plain", "--no-legend", "spinbox-vm-*").stdout
    vm_dir = systemd.path("/run/spinbox/vm")
    return {
        "scopes": [line.split()[0] for line in units.splitlines() if line.strip()],
        "qemu": systemd.processes("qemu-system"),
        "vm-files": sorted(str(p) for p in vm_dir.rglob("*")) if vm_dir.exists() else [],
        "vm-storage": sorted(p.name for p in systemd.path("/var/lib/spinbox/vms").glob("*")),
        "shims": systemd.processes("containerd-shim-spinbox-v1"),
        "pods": cri.crictl("pods", "-q").stdout.split(),
        "mounts": [
            target
            for target in systemd.run("findmnt", "-rn", "-o", "TARGET").stdout.split()
            if target.startswith(("/run/spinbox/", "/var/lib/spinbox/")) or "/io.containerd." in target
        ],
    }


NO_POD_LEFT = {key: [] for key in ("scopes", "qemu", "vm-files", "vm-storage", "shims", "pods", "mounts")}


def test_crictl_pods_run_at_once_finish_and_leave_nothing(cri: CriContainerd, stack: PrivateSystemd) -> None:
    stack.run("mkdir", "-p", f"{WORK}/logs")
    rules = iptables_rules(stack)
    for round_ in range(ROUNDS):
        names = [f"soak{round_}p{n}" for n in range(AT_ONCE)]
        for name in names:
            stack.write_file(f"{WORK}/{name}.json", json.dumps(pod_config(name)))
        started = time.monotonic()
        results = run_at_once(
            {name: crictl_argv(cri, "runp", "--runtime", "spinbox", f"{WORK}/{name}.json") for name in names}
        )
        pods = {
            name: output.strip().splitlines()[-1] for name, (status, output) in results.items() if status == 0
        }
        try:
            print(f"round {round_}: {AT_ONCE} crictl runp in {time.monotonic() - started:.1f} s")
            assert not failures(results), f"round {round_}:\n{failures(results)}"
            assert len(stack.processes("qemu-system")) == AT_ONCE
        finally:
            removed = run_at_once({name: crictl_argv(cri, "rmp", "-f", pod) for name, pod in pods.items()})
        assert not failures(removed), f"round {round_}:\n{failures(removed)}"
        deadline = time.monotonic() + 60
        found = cri_leftovers(stack, cri)
        while found != NO_POD_LEFT and time.monotonic() < deadline:
            time.sleep(0.5)
            found = cri_leftovers(stack, cri)
        assert found == NO_POD_LEFT, f"round {round_}"
        assert network_leftovers(stack) == NO_NETWORK_LEFT, f"round {round_}"
        assert iptables_rules(stack) == rules, f"round {round_}"
