"""bench/volumes: a virtio-fs volume against the container's own rootfs, in the same VM and run.

Inside one container (containerd 1.6, spinbox.service from this tree in the
tests' private systemd, TCG guest): 256 MiB written sequentially (fsync'd)
and read back after dropping the guest's page cache, and a tarball of 5,000
small files extracted, once into a host directory shared as a volume and
once into the container's rootfs (its ext4 writable layer on virtio-blk).
Then `ctr run --rm IMAGE true` with and without a volume, alternating: the
wall time and spinboxd's boot timeline (create to agent ready, split at
QEMU's start), and the memory (RSS and PSS) of QEMU and virtiofsd for a
running VM with and without a share.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOP))

from bench.lifecycle import guest_image, timed, watch_timelines  # noqa: E402
from tests.e2e.stack import BUILDS, IMAGE, RUNTIME, Containerd, spinbox_stack  # noqa: E402
from tests.harness.fixtures import artifacts_dir  # noqa: E402
from tests.harness.systemd import PrivateSystemd  # noqa: E402

HOST_DIR = "/var/lib/spinbox-bench-volumes"
FILES = 5000
SEQ_MIB = 256

# Times from the guest's /proc/uptime (10 ms resolution; every step takes seconds under TCG).
SCRIPT = f"""
t() {{ cut -d' ' -f1 /proc/uptime; }}
cp /vol/files.tar /files.tar
for where in /vol/w /rootfs-w; do
  mkdir -p $where
  a=$(t); dd if=/dev/zero of=$where/seq bs=1M count={SEQ_MIB} conv=fsync 2>/dev/null; b=$(t)
  sync; echo 3 > /proc/sys/vm/drop_caches
  c=$(t); dd if=$where/seq of=/dev/null bs=1M 2>/dev/null; d=$(t)
  rm $where/seq
  e=$(t); tar -xf /files.tar -C $where; sync; f=$(t)
  echo "$where $a $b $c $d $e $f"
done
"""


def make_tarball(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for n in range(FILES):
            data = (f"file {n}\n" * (1 + n % 64)).encode()
            info = tarfile.TarInfo(f"d{n // 100}/f{n}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def throughput(systemd: PrivateSystemd, containerd: Containerd) -> dict[str, tuple[float, float, float]]:
    result = containerd.ctr(
        "run", "--rm", "--privileged", "--runtime", RUNTIME,
        "--mount", f"type=bind,src={HOST_DIR},dst=/vol,options=rbind:rw",
        IMAGE, "bench-vol", "sh", "-c", SCRIPT,
        timeout=1800,
    )  # fmt: skip
    found = {}
    for line in result.stdout.splitlines():
        where, *stamps = line.split()
        a, b, c, d, e, f = map(float, stamps)
        found[where] = (SEQ_MIB / (b - a), SEQ_MIB / (d - c), FILES / (f - e))
    return found


def memory_kib(systemd: PrivateSystemd, pattern: str) -> tuple[int, int]:
    """(RSS, PSS) summed over the processes: PSS splits the guest RAM that QEMU and virtiofsd
    both map (the shared memfd) between them, so the PSS of the two adds up."""
    rss = pss = 0
    for pid in systemd.processes(pattern):
        rollup = systemd.run("cat", f"/proc/{pid}/smaps_rollup", check=False).stdout
        for line in rollup.splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                kib = int(rest.split()[0])
                rss, pss = (rss + kib, pss) if key == "Rss" else (rss, pss + kib)
    return rss, pss


QEMU = "^qemu-system"
VIRTIOFSD = "^/usr/(lib/qemu|libexec)/virtiofsd"


def memory(systemd: PrivateSystemd, containerd: Containerd, volume: bool) -> dict[str, tuple[int, int]]:
    """(RSS, PSS) of QEMU and of virtiofsd for a VM whose container is running."""
    mount = ["--mount", f"type=bind,src={HOST_DIR},dst=/vol,options=rbind:ro"] if volume else []
    containerd.ctr("run", "-d", "--runtime", RUNTIME, *mount, IMAGE, "bench-mem", "sleep", "600")
    try:
        time.sleep(2)
        return {"qemu": memory_kib(systemd, QEMU), "virtiofsd": memory_kib(systemd, VIRTIOFSD)}
    finally:
        containerd.ctr("task", "kill", "-s", "KILL", "bench-mem", check=False)
        systemd.wait_for("bench-mem to stop", lambda: containerd.tasks().get("bench-mem") != "RUNNING", 60)
        containerd.ctr("task", "delete", "bench-mem", check=False)
        containerd.ctr("container", "delete", "bench-mem", check=False)


BOOT_ROWS = (
    "wall, ctr run --rm (s)",
    "create to agent ready (s)",
    "  create to QEMU started (s)",
    "  QEMU started to agent ready (s)",
)


async def boots(
    systemd: PrivateSystemd, containerd: Containerd, runs: int
) -> dict[bool, list[tuple[float, ...]]]:
    """`ctr run --rm IMAGE true`, alternating without and with a volume: its wall time and,
    from spinboxd's boot timeline, the create to agent ready, split at QEMU's start (before it:
    the rootfs, the network, the scope and, with a share, its binds and virtiofsd's start)."""
    out: dict[bool, list[tuple[float, ...]]] = {False: [], True: []}
    for n in range(runs):
        for volume in (False, True):
            found: dict[str, dict[str, float]] = {}
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_timelines(systemd.bus_address, found, stop))
            mount = ["--mount", f"type=bind,src={HOST_DIR},dst=/vol,options=rbind:ro"] if volume else []
            argv = containerd.ctr_argv(
                "run", "--rm", "--runtime", RUNTIME, *mount, IMAGE, f"boot{n}{volume:d}", "true"
            )
            wall = await asyncio.to_thread(timed, argv)
            stop.set()
            await watcher
            (timeline,) = found.values() or [{"agent-ready": float("nan"), "qemu-started": 0.0}]
            ready, qemu = timeline["agent-ready"], timeline["qemu-started"]
            out[volume].append((wall, ready, qemu, ready - qemu))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/volumes", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/volumes runs containerd and VMs: run it as root")
    initrd = guest_image()
    with PrivateSystemd.booted(artifacts_dir() / "logs") as systemd, spinbox_stack(systemd, initrd):
        host = systemd.path(HOST_DIR)
        shutil.rmtree(host, ignore_errors=True)
        host.mkdir(parents=True)
        make_tarball(host / "files.tar")
        containerd = Containerd(systemd, BUILDS["1.6"])
        containerd.start()
        try:
            rates = throughput(systemd, containerd)
            boot = asyncio.run(boots(systemd, containerd, args.runs))
            mem_without = memory(systemd, containerd, volume=False)
            mem_with = memory(systemd, containerd, volume=True)
        finally:
            containerd.stop()
            shutil.rmtree(host, ignore_errors=True)

    vol, root = rates["/vol/w"], rates["/rootfs-w"]
    print("in one container (containerd 1.6, TCG guest): virtio-fs volume vs the container's rootfs")
    print(f"{'':<34}{'volume':>10}{'rootfs':>10}{'ratio':>8}")
    for i, label in enumerate(
        (f"write {SEQ_MIB} MiB (MiB/s)", f"read {SEQ_MIB} MiB (MiB/s)", f"untar {FILES} files (files/s)")
    ):
        print(f"{label:<34}{vol[i]:>10.1f}{root[i]:>10.1f}{vol[i] / root[i]:>8.2f}")
    print(f"ctr run --rm IMAGE true, {args.runs} runs each, alternating (medians)")
    print(f"{'':<34}{'no share':>10}{'share':>10}{'ratio':>8}")
    for i, label in enumerate(BOOT_ROWS):
        a = statistics.median(x[i] for x in boot[False])
        b = statistics.median(x[i] for x in boot[True])
        ratio = f"{b / a:>8.2f}" if a else f"{'':>8}"
        print(f"{label:<34}{a:>10.3f}{b:>10.3f}{ratio}")
    print("a running VM's memory (MiB): RSS and PSS (guest RAM mapped by both counted once in PSS)")
    print(f"{'':<34}{'no share':>10}{'share':>10}{'ratio':>8}")
    for what in ("qemu", "virtiofsd"):
        for i, kind in enumerate(("RSS", "PSS")):
            a, b = mem_without[what][i] / 1024, mem_with[what][i] / 1024
            ratio = f"{b / a:>8.2f}" if a else f"{'':>8}"
            print(f"{f'{what} {kind}':<34}{a:>10.1f}{b:>10.1f}{ratio}")
    a = sum(m[1] for m in mem_without.values()) / 1024
    b = sum(m[1] for m in mem_with.values()) / 1024
    print(f"{'QEMU + virtiofsd PSS':<34}{a:>10.1f}{b:>10.1f}{b / a:>8.2f}")


if __name__ == "__main__":
    main()
