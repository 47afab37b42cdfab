"""bench/resize: resizing a running VM, and the cost of being resizable, in one run.

Two VMs of the default size (1 vCPU, 512 MiB) boot under the host's accelerator, one
after the other: a fixed one (no -smp maxcpus, no virtio-mem device) and a resizable
one with spinboxd's default headroom (vm.max_vcpus, and vm.hotplug_memory_mib beyond
its boot memory, capped at vm.max_memory_mib and the host's memory). Once each has
settled idle, its QEMU's RSS and PSS and its guest's MemTotal are read. Then the
resizable one is grown (to 4 vCPUs and 2048 MiB, the guest bringing the vCPUs online)
and shrunk back, `--runs` times, and each is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOP))

from bench.lifecycle import guest_image  # noqa: E402
from spinbox import host  # noqa: E402
from spinbox.agent import AgentClient  # noqa: E402
from spinbox.config import VmConfig  # noqa: E402
from spinbox.vm import VirtualMachine, VmSpec, default_kernel, launch  # noqa: E402
from spinbox.vm.resize import GuestRefused, VmSize, resize  # noqa: E402

BOOT_TIMEOUT = 300.0


def memory_kib(pid: int) -> tuple[int, int]:
    """RSS and PSS of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return fields["Rss"], fields["Pss"]


async def guest(vm: VirtualMachine, vcpus: int) -> tuple[int, int]:
    agent = await AgentClient.connect(vm.control_address)
    try:
        reply = await agent.online_resources(vcpus)
    finally:
        await agent.close()
    return reply.online_cpus, reply.mem_total_kib


async def idle(spec: VmSpec, settle: float) -> dict[str, float]:
    started = time.monotonic()
    vm = await launch(spec)
    try:
        await vm.wait_ready(BOOT_TIMEOUT)
        ready = time.monotonic() - started
        await asyncio.sleep(settle)
        rss, pss = memory_kib(vm.pid)
        _, total = await guest(vm, spec.vcpus)
    finally:
        await vm.kill()
    return {
        "agent-ready s": ready,
        "QEMU RSS MiB": rss / 1024,
        "QEMU PSS MiB": pss / 1024,
        "MemTotal MiB": total / 1024,
    }


async def resizes(spec: VmSpec, runs: int) -> tuple[list[float], list[float], list[str]]:
    vm = await launch(spec)
    grows: list[float] = []
    shrinks: list[float] = []
    refusals: list[str] = []
    try:
        await vm.wait_ready(BOOT_TIMEOUT)
        for _ in range(runs):
            started = time.monotonic()
            await resize(vm, VmSize(4, 2048))
            cpus, _ = await guest(vm, 4)
            grows.append(time.monotonic() - started)
            assert cpus == 4, f"the guest has {cpus} vCPUs online, not 4"
            started = time.monotonic()
            try:
                await resize(vm, VmSize(spec.vcpus, spec.memory_mib))
            except GuestRefused as e:
                refusals.append(f"after {time.monotonic() - started:.1f} s: {e}")
                break
            await guest(vm, spec.vcpus)
            shrinks.append(time.monotonic() - started)
    finally:
        await vm.kill()
    return grows, shrinks, refusals


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="grow/shrink cycles (default 3)")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds an idle VM settles before it is read"
    )
    args = parser.parse_args()
    defaults = VmConfig()
    image = guest_image()
    with tempfile.TemporaryDirectory(prefix="spinbox-bench-resize-") as work:
        base = VmSpec(
            vm_id="bench-fixed", kernel=default_kernel(), initrd=image, runtime_dir=Path(work) / "fixed",
            vcpus=defaults.vcpus, memory_mib=defaults.memory_mib,
        )  # fmt: skip
        resizable = VmSpec(
            **{
                **base.__dict__,
                "vm_id": "bench-resizable",
                "runtime_dir": Path(work) / "resizable",
                "max_vcpus": defaults.max_vcpus,
                "max_memory_mib": min(
                    defaults.memory_mib + defaults.hotplug_memory_mib,
                    defaults.max_memory_mib,
                    host.memory_mib(),
                ),
            }
        )
        fixed = asyncio.run(idle(base, args.settle))
        headroom = asyncio.run(idle(resizable, args.settle))
        grows, shrinks, refusals = asyncio.run(resizes(resizable, args.runs))
    print(f"idle VM, {base.vcpus} vCPU / {base.memory_mib} MiB, settled {args.settle:g} s:")
    print(f"  {'':14} {'fixed':>10} {'resizable':>10} {'difference':>10}")
    for key in fixed:
        print(f"  {key:14} {fixed[key]:10.1f} {headroom[key]:10.1f} {headroom[key] - fixed[key]:+10.1f}")
    room = f"-smp maxcpus={resizable.max_vcpus}, up to {resizable.max_memory_mib} MiB by virtio-mem"
    print(f"  (resizable: {room})")
    print(f"resize, {args.runs} runs: grow to 4 vCPUs / 2048 MiB (vCPUs online in the guest):")
    print(f"  median {statistics.median(grows):.2f} s, runs " + ", ".join(f"{g:.2f}" for g in grows))
    print(f"shrink back to {base.vcpus} vCPU / {base.memory_mib} MiB:")
    if shrinks:
        print(f"  median {statistics.median(shrinks):.2f} s, runs " + ", ".join(f"{s:.2f}" for s in shrinks))
    for refusal in refusals:
        print(f"  refused {refusal}")


if __name__ == "__main__":
    main()
