"""bench/soak: many container lifecycles (`ctr run --rm IMAGE true`, a few
at a time) in spinbox VMs, counting after every batch of them what a VM may
leave behind: QEMU processes, VM scopes, mounts, loop devices, TAPs, network
namespaces, files under /run/spinbox and /var/lib/spinbox, iptables rules and
spinboxd's resident memory. The first column is the same run's baseline,
taken after a few warm-up lifecycles (layer cache filled, modules imported).

Every counter must come back to its baseline, and spinboxd's RSS may grow by
5 MiB at most; the exit status says whether they did.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOP))

from tests.e2e.stack import BUILDS, IMAGE, RUNTIME, Containerd, spinbox_stack  # noqa: E402
from tests.harness.evidence import save_evidence  # noqa: E402
from tests.harness.fixtures import artifacts_dir  # noqa: E402
from tests.harness.systemd import PrivateSystemd  # noqa: E402

RSS_GROWTH_MAX_KIB = 5 * 1024
CLIENT_DEADLINE = 300.0


def guest_image() -> Path:
    from guest.mkguest.image import ImageConfig, build
    from spinbox.vm.spec import default_kernel

    output = artifacts_dir() / "guest" / "initrd.img"
    build(ImageConfig(kernel_version=default_kernel().name.removeprefix("vmlinuz-")), output)
    return output


def files_under(systemd: PrivateSystemd, inside: str) -> int:
    root = systemd.path(inside)
    return sum(1 for _ in root.rglob("*")) if root.exists() else 0


def loop_devices(systemd: PrivateSystemd) -> int:
    """Loop devices backed by a file of this namespace's spinbox directories
    (the loop devices themselves are the whole machine's)."""
    listed = subprocess.run(
        ["losetup", "--list", "--json", "-O", "NAME,BACK-FILE,BACK-INO"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    count = 0
    for device in json.loads(listed.stdout or '{"loopdevices": []}').get("loopdevices", []):
        back = (device.get("back-file") or "").removesuffix(" (deleted)")
        if not back.startswith(("/var/lib/spinbox/", "/run/spinbox/")):
            continue
        try:
            if systemd.path(back).stat().st_ino == int(device.get("back-ino") or -1):
                count += 1
        except OSError:
            continue
    return count


def spinboxd_rss_kib(systemd: PrivateSystemd) -> int:
    pid = systemd.unit_property("spinbox.service", "MainPID")
    status = systemd.path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) if match else 0


def counters(systemd: PrivateSystemd) -> dict[str, int]:
    units = systemd.run("systemctl", "list-units", "--all", "--plain", "--no-legend", "spinbox-vm-*").stdout
    mounts = systemd.run("findmnt", "-rn", "-o", "TARGET").stdout.split()
    links = systemd.run("ip", "-o", "link", "show").stdout.splitlines()
    names = [line.split(": ")[1].split("@")[0] for line in links]
    rules = systemd.run("iptables-save", check=False).stdout.splitlines()
    return {
        "qemu processes": len(systemd.processes("qemu-system")),
        "vm scopes": len([line for line in units.splitlines() if line.strip()]),
        "mounts": len(
            [m for m in mounts if m.startswith(("/run/spinbox/", "/var/lib/spinbox/")) or ".task/" in m]
        ),
        "loop devices": loop_devices(systemd),
        "taps": len([n for n in names if n.startswith(("sbx-tap", "tap"))]),
        "veths": len([n for n in names if n.startswith("veth")]),
        "netns": len(list(systemd.path("/run/spinbox/netns").glob("*")))
        + len(list(systemd.path("/run/netns").glob("*"))),
        "files /run/spinbox": files_under(systemd, "/run/spinbox"),
        "files /var/lib/spinbox": files_under(systemd, "/var/lib/spinbox"),
        "iptables rules": len([r for r in rules if r.startswith(("-A", ":"))]),
        "spinboxd rss KiB": spinboxd_rss_kib(systemd),
    }


def batch(containerd: Containerd, names: list[str]) -> list[str]:
    """Run one lifecycle per name at once; the failures, as sentences."""
    started = {
        name: subprocess.Popen(
            containerd.ctr_argv("run", "--rm", "--runtime", RUNTIME, IMAGE, name, "true"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in names
    }
    deadline = time.monotonic() + CLIENT_DEADLINE
    failed = []
    for name, process in started.items():
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            failed.append(f"{name}: still running after {CLIENT_DEADLINE:g}s")
            continue
        if process.returncode != 0:
            failed.append(f"{name}: exit {process.returncode}: {output.strip()[-300:]}")
    return failed


def settle(systemd: PrivateSystemd, baseline: dict[str, int], timeout: float = 60) -> dict[str, int]:
    """Counters once asynchronous teardown had time to finish (RSS aside)."""
    deadline = time.monotonic() + timeout
    found = counters(systemd)
    while time.monotonic() < deadline and any(
        found[key] != baseline[key] for key in found if key != "spinboxd rss KiB"
    ):
        time.sleep(0.5)
        found = counters(systemd)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/soak", description=__doc__)
    parser.add_argument("--lifecycles", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="count after this many lifecycles")
    parser.add_argument("--at-once", type=int, default=4)
    parser.add_argument("--containerd", choices=sorted(BUILDS), default="2.x")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/soak runs containerd and VMs: run it as root")
    build = BUILDS[args.containerd] if BUILDS[args.containerd].available else BUILDS["1.6"]
    initrd = guest_image()
    columns: list[tuple[str, dict[str, int]]] = []
    failures: list[str] = []
    started = time.monotonic()
    with (
        PrivateSystemd.booted(artifacts_dir() / "logs") as systemd,
        spinbox_stack(systemd, initrd),
        Containerd.running(systemd, build) as containerd,
    ):
        failures += batch(containerd, [f"warm{n}" for n in range(args.at_once)])
        baseline = settle(systemd, counters(systemd), timeout=5)
        columns.append(("baseline", baseline))
        done = 0
        while done < args.lifecycles and not failures:
            count = min(args.at_once, args.lifecycles - done)
            failures += batch(containerd, [f"soak{done + n}" for n in range(count)])
            done += count
            # After the batch that reached (or passed) each multiple of --every.
            if done // args.every > (done - count) // args.every or done == args.lifecycles:
                columns.append((str(done), settle(systemd, baseline)))
                print(f"{done} lifecycles after {time.monotonic() - started:.0f} s", file=sys.stderr)
        final = columns[-1][1]
        leaked = [key for key in baseline if key != "spinboxd rss KiB" and final[key] != baseline[key]]
        growth = final["spinboxd rss KiB"] - baseline["spinboxd rss KiB"]
        if failures or leaked or growth > RSS_GROWTH_MAX_KIB:
            print(f"evidence: {save_evidence(systemd, artifacts_dir(), 'bench-soak')}", file=sys.stderr)

    print(f"bench/soak: {done} lifecycles (ctr run --rm, {args.at_once} at once), containerd {build.name}, "
          f"TCG guests, {time.monotonic() - started:.0f} s")  # fmt: skip
    print(f"{'after N lifecycles':<24}" + "".join(f"{name:>10}" for name, _ in columns) + f"{'growth':>10}")
    for key in baseline:
        row = "".join(f"{values[key]:>10}" for _, values in columns)
        print(f"{key:<24}{row}{final[key] - baseline[key]:>+10}")
    for failure in failures:
        print(f"FAILED {failure}")
    if leaked:
        print(f"LEAKED: {', '.join(leaked)}")
    if growth > RSS_GROWTH_MAX_KIB:
        print(f"spinboxd RSS grew by {growth} KiB (at most {RSS_GROWTH_MAX_KIB} KiB allowed)")
    return 1 if failures or leaked or growth > RSS_GROWTH_MAX_KIB else 0


if __name__ == "__main__":
    sys.exit(main())
