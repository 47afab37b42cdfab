"""bench/boot: how long spinbox's guest takes to boot, against a floor measured in the same run.

The floor is the same kernel, machine and devices booting a trivial init
(busybox-static's shell running `poweroff -f`): what no guest image can beat.
The guest is the real image (vminitd) booted until its agent answers Ping; until
vminitd exists, a Python init that prints a line on the console stands in.

`--kernel PATH` (repeatable) compares kernels in one run, e.g. Debian's cloud
kernel against kernel/build's module-free one: each gets its own image (no
modules for a kernel built without them) and its own floor, and the boots are
interleaved so that load on the machine hits all alike.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOP))

from guest.mkguest.cpio import Entry, write_newc  # noqa: E402
from guest.mkguest.image import BUSYBOX, ImageConfig, build, kernel_version_of  # noqa: E402
from guest.mkguest.kmod import module_free  # noqa: E402
from spinbox.shim.service import POD_HOTPLUG_PORTS  # noqa: E402
from spinbox.vm import VmSpec, choose_accel, default_kernel, launch  # noqa: E402

STAND_IN_INIT = """
import os


def main() -> None:
    import asyncio
    from google.protobuf import empty_pb2
    print("spinbox-bench: init ready", flush=True)
    os.execv("/bin/busybox", ["poweroff", "-f"])
"""
MARKER = b"spinbox-bench: init ready"


def build_floor(output: Path) -> None:
    entries = [
        Entry.directory("bin"),
        Entry.file("bin/busybox", BUSYBOX.path.read_bytes(), 0o755),
        Entry.directory("dev"),
        Entry.char_device("dev/console", 5, 1),
        Entry.file("init", b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n", 0o755),
    ]
    with output.open("wb") as out:
        write_newc(out, entries, 0)


def build_guest(work: Path, kernel: Path) -> tuple[Path, bool, float]:
    """The image to measure with `kernel`, whether it has the agent, and the build's seconds."""
    kernel_version = kernel_version_of(kernel)
    modules = not module_free(kernel)
    output = work / f"initrd-{kernel_version}.img"
    if importlib.util.find_spec("guest.vminitd") is not None:
        config = ImageConfig(kernel_version=kernel_version, kernel_modules=modules)
        agent = True
    else:
        (work / "benchinit").mkdir(exist_ok=True)
        (work / "benchinit" / "__init__.py").write_text("")
        (work / "benchinit" / "main.py").write_text(STAND_IN_INIT)
        config = ImageConfig(
            kernel_version=kernel_version,
            entry="benchinit.main:main",
            packages=("benchinit", "google.protobuf"),
            roots=(work,),
            tools=(BUSYBOX,),
            kernel_modules=modules,
        )
        agent = False
    result = build(config, output)
    return output, agent, result.seconds


def spec(kernel: Path, image: Path, run_dir: Path, hotplug_ports: int = 0) -> VmSpec:
    return VmSpec(
        vm_id="bench", kernel=kernel, initrd=image, runtime_dir=run_dir, hotplug_ports=hotplug_ports
    )


async def boot_floor(kernel: Path, image: Path, run_dir: Path) -> float:
    vm = await launch(spec(kernel, image, run_dir))
    try:
        await asyncio.wait_for(vm.wait_exit(), 300)
        return time.monotonic() - vm.state.stamps["exec"]
    finally:
        await vm.kill()


async def boot_guest(
    kernel: Path, image: Path, run_dir: Path, agent: bool, hotplug_ports: int = 0
) -> dict[str, float]:
    vm = await launch(spec(kernel, image, run_dir, hotplug_ports), start=False)
    reader, writer = await asyncio.open_unix_connection(str(vm.console_socket))
    try:
        await vm.resume()
        if agent:
            timeline = await vm.wait_ready(300)
        else:
            seen = b""
            while MARKER not in seen:
                chunk = await asyncio.wait_for(reader.read(4096), 300)
                if not chunk:
                    raise RuntimeError("the guest stopped before its init was ready")
                seen += chunk
            timeline = {**vm.timeline, "init-ready": time.monotonic() - vm.state.stamps["exec"]}
        start = time.monotonic()
        await vm.shutdown(30)
        return {**timeline, "shutdown (after ready)": time.monotonic() - start}
    finally:
        writer.close()
        await vm.kill()


def _row(title: str, cells: list[str], width: int) -> str:
    return f"{title:<48}" + "".join(f"{cell:>{width}}" for cell in cells)


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}" if values else "-"


async def main_async(runs: int, kernels: list[Path]) -> None:
    with tempfile.TemporaryDirectory(prefix="spinbox-bench-") as tmp:
        work = Path(tmp)
        floor_image = work / "floor.img"
        build_floor(floor_image)
        images = [build_guest(work, kernel) for kernel in kernels]
        agent = images[0][1]
        ready = "agent-ready" if agent else "init-ready"
        floors: list[list[float]] = [[] for _ in kernels]
        timelines: list[list[dict[str, float]]] = [[] for _ in kernels]
        pods: list[list[dict[str, float]]] = [[] for _ in kernels]
        for _ in range(runs):  # interleaved, so load on the machine hits all alike
            for index, (kernel, (image, _, _)) in enumerate(zip(kernels, images, strict=True)):
                floors[index].append(await boot_floor(kernel, floor_image, work / "run"))
                timelines[index].append(await boot_guest(kernel, image, work / "run", agent))
                # A pod's VM: the same guest with spare PCIe ports for its later containers' disks.
                pods[index].append(
                    await boot_guest(kernel, image, work / "run", agent, hotplug_ports=POD_HOTPLUG_PORTS)
                )
        print(f"accelerator: {choose_accel('auto')}  runs: {runs} (medians)")
        if not agent:
            print("note: no vminitd in this tree; a Python init printing a line stands in for the agent")
        for index, (kernel, (image, _, seconds)) in enumerate(zip(kernels, images, strict=True)):
            print(
                f"kernel {index + 1}: {kernel} ({kernel.stat().st_size / 1e6:.1f} MB); "
                f"image {image.stat().st_size / 1e6:.1f} MB, built in {seconds:.2f} s"
            )
        width = 12
        everything = [t for per_kernel in timelines for t in per_kernel]
        phases = sorted(
            {p for t in everything for p in t},
            key=lambda p: statistics.median(t[p] for t in everything if p in t),
        )
        guest = [p for p in phases if p.startswith("guest-")]
        host = [p for p in phases if p not in guest]
        header = [f"kernel {i + 1}" for i in range(len(kernels))]
        for title, group in (
            ("host phase (s since QEMU's exec)", host),
            ("guest phase (s since the guest kernel started)", guest),
        ):
            if group:
                print(_row(title, header, width))
            for phase in group:
                cells = [_median([t[phase] for t in per_kernel if phase in t]) for per_kernel in timelines]
                print(_row(f"  {phase}", cells, width))
        print(_row("floor (exec to poweroff)", [_median(values) for values in floors], width))
        ratios = [
            statistics.median(t[ready] for t in per_kernel) / statistics.median(values)
            for per_kernel, values in zip(timelines, floors, strict=True)
        ]
        print(_row(f"ratio {ready} / floor", [f"{r:.2f}" for r in ratios], width))
        pod_ready = [statistics.median(t[ready] for t in per_kernel) for per_kernel in pods]
        print(_row(f"{ready}, pod VM ({POD_HOTPLUG_PORTS} ports)", [f"{r:.3f}" for r in pod_ready], width))
        pod_ratios = [
            pod / statistics.median(t[ready] for t in per_kernel)
            for pod, per_kernel in zip(pod_ready, timelines, strict=True)
        ]
        print(_row("ratio pod VM / plain VM", [f"{r:.2f}" for r in pod_ratios], width))


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/boot", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--kernel",
        type=Path,
        action="append",
        help="a guest kernel to measure (repeatable; default: the newest Debian cloud kernel)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    kernels = [kernel.absolute() for kernel in args.kernel or [default_kernel()]]
    for kernel in kernels:
        if not kernel.is_file():
            parser.error(f"kernel {kernel} does not exist")
    asyncio.run(main_async(args.runs, kernels))


if __name__ == "__main__":
    main()
