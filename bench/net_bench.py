"""bench/net: host→guest TCP throughput through spinbox's network, against host loopback.

Everything runs in a network namespace the bench creates (it re-executes itself
under `unshare --net`), standing in for the host: spinbox's default CNI network
(bridge spinbox0, 10.77.0.0/16) gives a QEMU guest a TAP redirected to its veth.
The guest is the host's kernel with a busybox initramfs whose /init loads the
virtio-net modules, configures eth0 from what setup_network returned and runs a
`nc -l` sink per measurement. The same sink on the namespace's loopback is the
baseline, measured in the same run.

Usage: bench/net [--mib N] [--runs N] [--accel tcg|kvm]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOP))

from spinbox.net import NetConfig, setup_network, teardown_network  # noqa: E402

FIRST_PORT = 5001
BOOT_TIMEOUT = 300.0  # TCG boots take seconds; this only bounds a hung guest
GUEST_MODULES = ("virtio_pci", "virtio_net")


def kernel_and_modules() -> tuple[Path, Path]:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        sys.exit("bench/net: no kernel in /boot (install linux-image-cloud-amd64)")
    kernel = kernels[-1]
    return kernel, Path("/lib/modules") / kernel.name.removeprefix("vmlinuz-")


def module_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files for `wanted` and their dependencies, dependencies first (modules.dep)."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        module, _, rest = line.partition(":")
        deps[module] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(module: str) -> None:
        for dep in reversed(deps[module]):
            visit(dep)
        if module not in order:
            order.append(module)

    for name in wanted:
        if name in by_name:  # absent: built into the kernel
            visit(by_name[name])
    return [modules_dir / m for m in order]


def build_initramfs(work: Path, modules: list[Path], address: str, gateway: str, runs: int) -> Path:
    root = work / "root"
    for d in ("bin", "proc", "sys", "dev", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    loads = []
    for module in modules:
        shutil.copy(module, root / "lib/modules" / module.name)
        loads.append(f"insmod /lib/modules/{module.name}")
    sinks = [f"sleep 100000 | nc -l -p {FIRST_PORT + i} > /dev/null &" for i in range(runs)]
    init = "\n".join(
        [
            "#!/bin/busybox sh",
            "/bin/busybox --install -s /bin",
            "mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev",
            *loads,
            "ip link set lo up",
            "ip link set eth0 up",
            f"ip addr add {address} dev eth0",
            f"ip route add default via {gateway}",
            *sinks,
            "echo SPINBOX-BENCH-READY",
            "sleep 100000",
        ]
    )
    (root / "init").write_text(init + "\n")
    (root / "init").chmod(0o755)
    image = work / "initramfs.cpio"
    files = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
    with open(image, "wb") as out:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, stdout=out, check=True)
    return image


def connect(host: str, port: int) -> socket.socket:
    """A connection to a sink that may still be starting."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        try:
            return socket.create_connection((host, port), timeout=BOOT_TIMEOUT)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def send(host: str, port: int, size: int) -> float:
    """Seconds to push `size` bytes to a sink and see it read them all (its close)."""
    chunk = b"\0" * (1 << 20)
    with connect(host, port) as sock:
        start = time.monotonic()
        sent = 0
        while sent < size:
            sent += sock.send(chunk[: size - sent])
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
        return time.monotonic() - start


def loopback_baseline(size: int, runs: int) -> list[float]:
    results = []
    for i in range(runs):
        port = FIRST_PORT + 100 + i
        sink = subprocess.Popen(
            ["sh", "-c", f"sleep 100000 | busybox nc -l -p {port} > /dev/null"], start_new_session=True
        )
        try:
            results.append(size / send("127.0.0.1", port, size))
        finally:
            os.killpg(sink.pid, 9)
            sink.wait()
    return results


async def guest_throughput(work: Path, size: int, runs: int, accel: str) -> tuple[list[float], float]:
    config = NetConfig(run_dir=work / "run")
    network = await setup_network("bench-net", None, config)
    try:
        [iface] = network.guest.interfaces
        address = iface.addresses[0]
        gateway = network.guest.routes[0].gateway
        guest_ip = address.split("/")[0]
        kernel, modules_dir = kernel_and_modules()
        image = build_initramfs(work, module_order(modules_dir, GUEST_MODULES), address, gateway, runs)
        nic = network.nics[0]
        console = work / "console.log"
        qemu = [
            "qemu-system-x86_64",
            "-accel", accel,
            "-machine", "pc",
            "-m", "256",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(kernel),
            "-initrd", str(image),
            "-append", "console=ttyS0 quiet panic=-1",
            "-serial", f"file:{console}",
            "-netdev", f"tap,id=net0,fd={nic.tap_fd}",
            "-device", f"virtio-net-pci,netdev=net0,mac={nic.mac}",
        ]  # fmt: skip
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(*qemu, pass_fds=[nic.tap_fd], stdin=subprocess.DEVNULL)
        network.close()
        try:
            deadline = started + BOOT_TIMEOUT
            while "SPINBOX-BENCH-READY" not in (console.read_text() if console.exists() else ""):
                if proc.returncode is not None or time.monotonic() > deadline:
                    sys.exit(f"bench/net: the guest did not come up; console:\n{console.read_text()}")
                await asyncio.sleep(0.2)
            boot = time.monotonic() - started
            results = [
                size / await asyncio.to_thread(send, guest_ip, FIRST_PORT + i, size) for i in range(runs)
            ]
            return results, boot
        finally:
            proc.kill()
            await proc.wait()
    finally:
        network.close()
        await teardown_network("bench-net", config)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/net", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="data sent per run (MiB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm"))
    args = parser.parse_args()
    if os.environ.get("SPINBOX_BENCH_NETNS") != "1":
        # Re-run inside a private network namespace: the bridge, the rules and all traffic stay there.
        env = {**os.environ, "SPINBOX_BENCH_NETNS": "1"}
        os.execvpe("unshare", ["unshare", "--net", sys.executable, __file__, *sys.argv[1:]], env)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    size = args.mib << 20
    with tempfile.TemporaryDirectory(prefix="spinbox-bench-net-") as tmp:
        guest, boot = asyncio.run(guest_throughput(Path(tmp), size, args.runs, args.accel))
    loopback = loopback_baseline(size, args.runs)

    def mib_s(values: list[float]) -> str:
        runs = ", ".join(f"{v / (1 << 20):.1f}" for v in values)
        return f"{statistics.median(values) / (1 << 20):8.1f} MiB/s (runs: {runs})"

    print(f"bench/net: {args.mib} MiB per run, {args.runs} runs, accel={args.accel}, guest boot {boot:.1f}s")
    print(f"host -> guest TCP (TAP + tc mirred, virtio-net): {mib_s(guest)}")
    print(f"host loopback TCP (baseline, same run):          {mib_s(loopback)}")
    print(f"ratio guest/loopback: {statistics.median(guest) / statistics.median(loopback):.3f}")


if __name__ == "__main__":
    main()
