"""bench/net: host→guest TCP throughput through spinbox's network, against host loopback.

Everything runs in a network namespace the bench creates (it re-executes itself
under `unshare --net`), standing in for the host: spinbox's default CNI network
(bridge spinbox0, 10.77.0.0/16) gives a QEMU guest a TAP redirected to its veth.
The guest runs on spinbox's own QEMU command line (spinbox.vm) from an image
built by spinbox-mkguest whose PID 1 configures eth0 from what setup_network
returned and runs a busybox `nc -l` sink per measurement. The same sink on the namespace's loopback is the
baseline, measured in the same run.

Usage: bench/net [--mib N] [--runs N] [--accel tcg|kvm]
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
from spinbox.vm import VirtualMachine, VmSpec, default_kernel, launch  # noqa: E402
from tests.harness.initimage import build_init_image  # noqa: E402

FIRST_PORT = 5001
BOOT_TIMEOUT = 300.0  # TCG boots take seconds; this only bounds a hung guest


# PID 1 of the bench guest (an image built by spinbox-mkguest, with busybox):
# loads the image's modules, configures eth0 as the kernel command line says,
# starts one `nc -l` sink per run and says so on the console.
BENCH_INIT = """
import subprocess


def sh(command):
    subprocess.run(["/bin/busybox", "sh", "-c", command], check=False)


def main():
    sh("busybox mkdir -p /proc /sys /dev; busybox mount -t proc proc /proc")
    sh("busybox mount -t sysfs sys /sys; busybox mount -t devtmpfs dev /dev")
    for module in open("/etc/spinbox/modules").read().split():
        sh("busybox insmod " + module)
    words = [w for w in open("/proc/cmdline").read().split() if w.startswith("spinbox.bench=")]
    address, gateway, ports = words[0].split("=", 1)[1].split(",", 2)
    sh("busybox ip link set lo up; busybox ip link set eth0 up")
    sh("busybox ip addr add %s dev eth0; busybox ip route add default via %s" % (address, gateway))
    for port in ports.split(","):
        sh("(busybox sleep 1000000 | busybox nc -l -p %s > /dev/null) &" % port)
    print("SPINBOX-BENCH-READY", flush=True)
    sh("busybox sleep 1000000")
"""


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


async def wait_console(vm: VirtualMachine, marker: bytes) -> None:
    reader, writer = await asyncio.open_unix_connection(str(vm.console_socket))
    seen = b""
    try:
        while marker not in seen:
            chunk = await asyncio.wait_for(reader.read(4096), BOOT_TIMEOUT)
            if not chunk:
                sys.exit(f"bench/net: the guest did not come up; console:\n{seen.decode(errors='replace')}")
            seen = seen[-4096:] + chunk
    finally:
        writer.close()


async def guest_throughput(work: Path, size: int, runs: int, accel: str) -> tuple[list[float], float]:
    config = NetConfig(run_dir=work / "run")
    image = build_init_image(work, "spinboxbenchinit", BENCH_INIT)
    network = await setup_network("bench-net", None, config)
    try:
        address = network.guest.interfaces[0].addresses[0]
        gateway = network.guest.routes[0].gateway
        ports = ",".join(str(FIRST_PORT + i) for i in range(runs))
        spec = VmSpec(
            vm_id="bench-net",
            kernel=default_kernel(),
            initrd=image,
            runtime_dir=work / "vm",
            kernel_args=(f"spinbox.bench={address},{gateway},{ports}",),
            nics=tuple(network.nics),
            accel=accel,  # type: ignore[arg-type]
        )
        started = time.monotonic()
        vm = await launch(spec)
        network.close()
        try:
            await wait_console(vm, b"SPINBOX-BENCH-READY")
            boot = time.monotonic() - started
            guest_ip = address.split("/")[0]
            results = [
                size / await asyncio.to_thread(send, guest_ip, FIRST_PORT + i, size) for i in range(runs)
            ]
            return results, boot
        finally:
            await vm.kill()
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
