"""bench/density: host memory per idle container, VMs booted cold against VMs
restored from a template, in the same run.

N containers running `sleep` are started with ctr (containerd 1.6, spinbox
from this tree in the tests' private systemd), then left to settle; the
proportional set size (PSS, what smem shows: a page shared by k processes
counts 1/k to each) of every QEMU, shim and virtiofsd serving them is summed,
guest pages included. A template's RAM is shared by the VMs restored from it,
so it counts once across them. "Fit" is the host's MemAvailable before the
containers started divided by the memory per container. The shims' RSS (pages
shared with other processes counted whole) is shown beside their PSS.

The CPU an idle container's QEMU and shim use while they settle, with the memory
per container, gives the RuntimeClass's overhead.podFixed
(packaging/kubernetes/runtimeclass.yaml): memory rounded up to 16 MiB and CPU to
10 millicores, for the boot mode a package installs by default (cold).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOP))

from bench.lifecycle import guest_image  # noqa: E402
from tests.e2e.stack import BUILDS, IMAGE, RUNTIME, Containerd, spinbox_stack  # noqa: E402
from tests.harness.fixtures import artifacts_dir  # noqa: E402
from tests.harness.systemd import PrivateSystemd  # noqa: E402


def memory_kib(systemd: PrivateSystemd, pid: int, field: str = "Pss") -> int:
    """The PSS (or another smaps_rollup field, such as Rss) of a process of the private systemd's
    PID namespace."""
    result = systemd.run("cat", f"/proc/{pid}/smaps_rollup", check=False)
    if result.returncode != 0:
        raise SystemExit(f"cannot read the memory of pid {pid}: {result.stderr.strip()}")
    text = result.stdout
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(f"{field}:"))


def pss_kib(systemd: PrivateSystemd, pid: int) -> int:
    return memory_kib(systemd, pid, "Pss")


def cpu_seconds(systemd: PrivateSystemd, pid: int) -> float:
    """User and system CPU time a process of the private systemd's PID namespace has used."""
    result = systemd.run("cat", f"/proc/{pid}/stat", check=False)
    if result.returncode != 0:
        raise SystemExit(f"cannot read the CPU time of pid {pid}: {result.stderr.strip()}")
    # Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    fields = result.stdout.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise SystemExit("no MemAvailable in /proc/meminfo")


def serving(systemd: PrivateSystemd, prefix: str) -> dict[str, list[int]]:
    """The pids of the QEMUs, shims and virtiofsds of the benchmark's containers."""
    return {
        "qemu": systemd.processes(f"process=spinbox-vm-default-{prefix}"),
        "shim": systemd.processes(f"containerd-shim-spinbox-v1 .*-id {prefix}"),
        "virtiofsd": systemd.processes(f"virtiofsd.*{prefix}"),
    }


def measure(systemd: PrivateSystemd, initrd: Path, boot: str, count: int, settle: float) -> dict[str, float]:
    prefix = f"dens{boot[0]}"
    with spinbox_stack(systemd, initrd, boot=boot):
        containerd = Containerd(systemd, BUILDS["1.6"])
        containerd.start()
        available = mem_available_kib()
        names = [f"{prefix}{n}" for n in range(count)]
        started = time.monotonic()
        try:
            for name in names:
                containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, name, "sleep", "3600")
            start_s = time.monotonic() - started
            busy = serving(systemd, prefix)
            cpu_before = sum(cpu_seconds(systemd, p) for k in ("qemu", "shim") for p in busy[k])
            settle_started = time.monotonic()
            time.sleep(settle)  # the guests go idle; free page reporting hands freed pages back
            cpu_used = sum(cpu_seconds(systemd, p) for k in ("qemu", "shim") for p in busy[k]) - cpu_before
            idle_cpu = cpu_used / (time.monotonic() - settle_started) / count
            pids = serving(systemd, prefix)
            for kind in ("qemu", "shim"):
                if len(pids[kind]) != count:
                    raise SystemExit(f"expected {count} of {kind}, found {len(pids[kind])}")
            per_kind = {kind: sum(pss_kib(systemd, p) for p in found) / 1024 for kind, found in pids.items()}
            qemu_each = [pss_kib(systemd, p) / 1024 for p in pids["qemu"]]
            shim_rss = [memory_kib(systemd, p, "Rss") / 1024 for p in pids["shim"]]
        finally:
            for name in names:
                containerd.ctr("task", "kill", "-s", "KILL", name, check=False)
            for name in names:
                systemd.wait_for(
                    f"{name} to stop", lambda n=name: containerd.tasks().get(n) != "RUNNING", 120
                )
                containerd.ctr("task", "delete", name, check=False)
                containerd.ctr("container", "delete", name, check=False)
            containerd.stop()
    total = sum(per_kind.values())
    per_container = total / count
    return {
        "start_s": start_s,
        "qemu": per_kind["qemu"] / count,
        "qemu_median": statistics.median(qemu_each),
        "shim": per_kind["shim"] / count,
        "shim_rss": statistics.median(shim_rss),
        "virtiofsd": per_kind["virtiofsd"] / count,
        "per_container": per_container,
        "fit": available / 1024 / per_container,
        "idle_millicores": idle_cpu * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/density", description=__doc__)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument(
        "--settle", type=float, default=20.0, help="seconds the containers idle before measuring"
    )
    parser.add_argument(
        "--boot",
        choices=("cold", "template"),
        action="append",
        help="only these boot modes (default: both, in the same run)",
    )
    args = parser.parse_args()
    boots = tuple(args.boot or ("cold", "template"))
    if os.geteuid() != 0:
        raise SystemExit("bench/density runs containerd and VMs: run it as root")
    initrd = guest_image()
    results = {}
    with PrivateSystemd.booted(artifacts_dir() / "logs") as systemd:
        for boot in boots:
            results[boot] = measure(systemd, initrd, boot, args.count, args.settle)
    print(f"{args.count} idle containers (sleep), PSS in MiB per container; containerd 1.6, TCG guests")
    print(f"{'':<36}" + "".join(f"{b:>12}" for b in boots))
    rows = [
        ("QEMU (guest pages included)", "qemu", "{:.1f}"),
        ("  median QEMU", "qemu_median", "{:.1f}"),
        ("shim", "shim", "{:.1f}"),
        ("  median shim RSS", "shim_rss", "{:.1f}"),
        ("virtiofsd", "virtiofsd", "{:.1f}"),
        ("host memory per container", "per_container", "{:.1f}"),
        ("containers that fit in MemAvailable", "fit", "{:.0f}"),
        ("idle CPU per container (millicores)", "idle_millicores", "{:.0f}"),
        (f"seconds to start all {args.count}", "start_s", "{:.1f}"),
    ]
    for title, key, fmt in rows:
        print(f"{title:<36}" + "".join(f"{fmt.format(results[b][key]):>12}" for b in boots))
    if len(boots) == 2:
        ratio = results["template"]["per_container"] / results["cold"]["per_container"]
        print(f"ratio template / cold (memory per container): {ratio:.2f}")
    basis = "cold" if "cold" in results else boots[0]
    memory = math.ceil(results[basis]["per_container"] / 16) * 16
    cpu = max(10, math.ceil(results[basis]["idle_millicores"] / 10) * 10)
    print(f'RuntimeClass overhead.podFixed ({basis} boot): memory: "{memory}Mi", cpu: "{cpu}m"')


if __name__ == "__main__":
    main()
