"""spinbox containers on the network the way runc containers would be: the
default CNI network for `ctr run`, nerdctl's network with a published port,
clean teardown over many cycles, and configuration errors a user can act on.
Containers share VMs where the behaviour shown allows (under TCG a boot takes
seconds)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e.stack import (
    BUILDS,
    IMAGE,
    NERDCTL,
    NOTHING_LEFT,
    RUNTIME,
    Containerd,
    wait_until_clean,
)
from tests.e2e.test_spinboxctl import spinboxctl
from tests.harness.systemd import PrivateSystemd

BRIDGE_ADDRESS = "10.77.0.1"
# A page served by busybox httpd from the container's root directory.
SERVE_PAGE = "echo hello-from-$(hostname) > /index.html && exec httpd -f -p 80 -h /"
HTTP_GET = "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc {address} {port}"
CYCLES = 20


@pytest.fixture(scope="module")
def containerd(stack: PrivateSystemd) -> Iterator[Containerd]:
    """containerd 2.x where installed (nerdctl needs it), else Debian's 1.6."""
    build = BUILDS["2.x"] if BUILDS["2.x"].available else BUILDS["1.6"]
    with Containerd.running(stack, build) as instance:
        yield instance


def network_leftovers(systemd: PrivateSystemd) -> dict[str, list[str]]:
    """What a VM's network may leave behind: namespaces, TAPs and veths in the
    host namespace, IPAM leases, spinbox.net's state files."""
    links = systemd.run("ip", "-o", "link", "show").stdout.splitlines()
    names = [line.split(": ")[1].split("@")[0] for line in links]
    # spinbox's own host-local leases, and those of nerdctl's networks.
    lease_dirs = [
        *systemd.path("/run/spinbox/cni").glob("*"),
        *systemd.path("/var/lib/cni/networks").glob("*"),
    ]
    return {
        "netns": sorted(p.name for p in systemd.path("/run/spinbox/netns").glob("*")),
        "taps-and-veths": sorted(n for n in names if n.startswith(("veth", "sbx-tap", "tap"))),
        "leases": sorted(
            p.name for d in lease_dirs for p in d.glob("*") if re.match(r"^[0-9a-f.:]+$", p.name)
        ),
        "state": sorted(p.name for p in systemd.path("/run/spinbox/net").glob("*")),
    }


NO_NETWORK_LEFT: dict[str, list[str]] = {"netns": [], "taps-and-veths": [], "leases": [], "state": []}


def guest_address(containerd: Containerd, container: str) -> str:
    """The container's IPv4 address on eth0, as `ip addr` in it shows."""
    shown = containerd.ctr(
        "task", "exec", "--exec-id", "addr", container, "ip", "-4", "-o", "addr", "show", "eth0"
    )
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", shown.stdout)
    assert match, shown.stdout
    return match.group(1)


def test_default_network_containers_reach_each_other_the_bridge_and_the_host(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "web1", "sh", "-c", SERVE_PAGE)
    containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "peer1", "sleep", "3600")
    try:
        web, peer = guest_address(containerd, "web1"), guest_address(containerd, "peer1")
        # What the leftover checks below look for is there while the VMs run.
        in_use = network_leftovers(stack)
        assert sorted(in_use["leases"]) == sorted([web, peer])
        assert {key: len(found) for key, found in in_use.items()} == {
            "netns": 2, "taps-and-veths": 2, "leases": 2, "state": 2,
        }  # fmt: skip
        assert web != peer
        assert web.startswith("10.77.") and peer.startswith("10.77.")

        def exec_in(container: str, script: str) -> str:
            result = containerd.ctr(
                "task", "exec", "--exec-id", "probe", container, "sh", "-c", script, check=False
            )
            assert result.returncode == 0, (script, result.stdout, result.stderr)
            return result.stdout

        exec_in("peer1", f"ping -c 1 -W 10 {web}")
        exec_in("peer1", f"ping -c 1 -W 10 {BRIDGE_ADDRESS}")
        exec_in("web1", f"ping -c 1 -W 10 {peer}")
        assert "hello-from-" in exec_in("peer1", HTTP_GET.format(address=web, port=80))

        # spinboxctl shows the VM's address; from the host (the namespace
        # spinboxd and containerd run in) the server answers there.
        status = spinboxctl(stack, "status", "web1")
        assert re.search(rf"Addresses\s+{re.escape(web)}/16\b", status), status
        from_host = stack.run("curl", "-sSi", "--max-time", "120", f"http://{web}/index.html", check=False)
        assert from_host.returncode == 0, from_host.stderr
        assert "200 OK" in from_host.stdout and "hello-from-" in from_host.stdout
    finally:
        for container in ("web1", "peer1"):
            containerd.ctr("task", "kill", "-s", "KILL", container, check=False)
        for container in ("web1", "peer1"):
            containerd.ctr("task", "delete", "-f", container, check=False)
            containerd.ctr("container", "delete", container, check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
    assert network_leftovers(stack) == NO_NETWORK_LEFT


def test_nerdctl_published_port_answers_on_loopback(containerd: Containerd, stack: PrivateSystemd) -> None:
    if containerd.build.name == "1.6":
        pytest.skip("nerdctl v2 needs containerd 1.7 or newer")
    if not NERDCTL.exists():
        pytest.skip("nerdctl is not installed (tools/install-test-clients)")
    options = ("--name", "pub1", "--runtime", RUNTIME, "-p", "18080:80")
    containerd.nerdctl("run", "-d", *options, IMAGE, "sh", "-c", SERVE_PAGE)
    try:
        # The server starts after `nerdctl run -d` returns: ask until it listens.
        answer = stack.run(
            "curl", "-sSi", "--max-time", "120", "--retry", "60", "--retry-connrefused", "--retry-delay", "1",
            "http://127.0.0.1:18080/index.html", check=False,
        )  # fmt: skip
        assert answer.returncode == 0, answer.stderr
        assert "200 OK" in answer.stdout and "hello-from-" in answer.stdout
        # What the leftover check below looks for is there while the VM runs.
        in_use = network_leftovers(stack)
        assert (len(in_use["netns"]), len(in_use["leases"]), len(in_use["state"])) == (1, 1, 1), in_use
    finally:
        containerd.nerdctl("rm", "-f", "pub1", check=False)
    # nerdctl v2.1 leaves its client-side FIFOs behind, with runc as well.
    stack.run("sh", "-c", "rm -rf /run/containerd/fifo/*")
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
    assert network_leftovers(stack) == NO_NETWORK_LEFT


def test_create_delete_cycles_leave_no_network_behind(containerd: Containerd, stack: PrivateSystemd) -> None:
    # Two containers at a time: their networks are set up and torn down side by side.
    for pair in range(CYCLES // 2):
        runs = {
            name: subprocess.Popen(
                containerd.ctr_argv("run", "--rm", "--runtime", RUNTIME, IMAGE, name, "true"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in (f"cycle{pair}a", f"cycle{pair}b")
        }
        for name, run in runs.items():
            _, stderr = run.communicate(timeout=300)
            assert run.returncode == 0, (name, stderr)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
    assert network_leftovers(stack) == NO_NETWORK_LEFT


CONFIG = "/etc/spinbox/spinbox.toml"


@pytest.mark.parametrize(
    ("network_table", "named"),
    [
        ('plugin_path = "/etc/spinbox/no-plugins"', "bridge"),
        ('conflist = "/etc/spinbox/broken.conflist"', "/etc/spinbox/broken.conflist"),
    ],
    ids=["missing-plugin", "invalid-conflist"],
)
def test_network_misconfiguration_is_named_to_the_user_and_leaves_nothing(
    containerd: Containerd, stack: PrivateSystemd, network_table: str, named: str
) -> None:
    original = stack.path(CONFIG).read_text()
    stack.run("mkdir", "-p", "/etc/spinbox/no-plugins")
    stack.write_file("/etc/spinbox/broken.conflist", json.dumps({"cniVersion": "1.0.0", "name": "x"})[:-3])
    stack.write_file(CONFIG, f"{original}\n[network]\n{network_table}\n")
    stack.systemctl("restart", "spinbox.service")
    try:
        result = containerd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "badnet1", "true", check=False)
        assert result.returncode != 0
        assert named in result.stderr, result.stderr
        # No VM was started: the daemon's own log is where more is said.
        assert "journalctl -u spinbox.service" in result.stderr
        containerd.ctr("container", "delete", "badnet1", check=False)
        assert wait_until_clean(stack, containerd) == NOTHING_LEFT
        assert network_leftovers(stack) == NO_NETWORK_LEFT
    finally:
        stack.write_file(CONFIG, original)
        stack.systemctl("restart", "spinbox.service")
