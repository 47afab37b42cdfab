"""bench/boot: how long spinbox's guest takes to boot, against a floor measured in the same run.

The floor is the same kernel, machine and devices booting a trivial init
(busybox-static's shell running `poweroff -f`): what no guest image can beat.
The guest is the real image (vminitd) booted until its agent answers Ping; until
vminitd exists, a Python init that prints a line on the console stands in.
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
from guest.mkguest.image import BUSYBOX, ImageConfig, build  # noqa: E402
from spinbox.shim.service import POD_HOTPLUG_PORTS as POD_PORTS  # noqa: E402
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


def build_guest(work: Path) -> tuple[Path, bool, float]:
    """The image to measure, whether it has the agent, and the build's seconds."""
    kernel_version = default_kernel().name.removeprefix("vmlinuz-")
    output = work / "initrd.img"
    if importlib.util.find_spec("guest.vminitd") is not None:
        config = ImageConfig(kernel_version=kernel_version)
        agent = True
    else:
        (work / "benchinit").mkdir()
        (work / "benchinit" / "__init__.py").write_text("")
        (work / "benchinit" / "main.py").write_text(STAND_IN_INIT)
        config = ImageConfig(
            kernel_version=kernel_version,
            entry="benchinit.main:main",
            packages=("benchinit", "google.protobuf"),
            roots=(work,),
            tools=(BUSYBOX,),
        )
        agent = False
    result = build(config, output)
    return output, agent, result.seconds


def spec(image: Path, run_dir: Path, hotplug_ports: int | None = None) -> VmSpec:
    ports = {} if hotplug_ports is None else {"hotplug_ports": hotplug_ports}
    return VmSpec(vm_id="bench", kernel=default_kernel(), initrd=image, runtime_dir=run_dir, **ports)


async def boot_floor(image: Path, run_dir: Path) -> float:
    vm = await launch(spec(image, run_dir))
    try:
        await asyncio.wait_for(vm.wait_exit(), 300)
        return time.monotonic() - vm.state.stamps["exec"]
    finally:
        await vm.kill()


async def boot_guest(
    image: Path, run_dir: Path, agent: bool, hotplug_ports: int | None = None
) -> dict[str, float]:
    vm = await launch(spec(image, run_dir, hotplug_ports), start=False)
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


async def main_async(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="spinbox-bench-") as tmp:
        work = Path(tmp)
        floor_image = work / "floor.img"
        build_floor(floor_image)
        image, agent, build_seconds = build_guest(work)
        ready = "agent-ready" if agent else "init-ready"
        floors: list[float] = []
        timelines: list[dict[str, float]] = []
        pod_timelines: list[dict[str, float]] = []
        for _ in range(runs):  # interleaved, so load on the machine hits all alike
            floors.append(await boot_floor(floor_image, work / "run"))
            timelines.append(await boot_guest(image, work / "run", agent))
            # The same guest with the spare PCIe root ports a pod's VM gets for its later disks.
            pod_timelines.append(await boot_guest(image, work / "run", agent, hotplug_ports=POD_PORTS))
        accel = choose_accel("auto")
        print(f"kernel: {default_kernel()}  accelerator: {accel}  runs: {runs} (medians)")
        print(f"image: {image.stat().st_size / 1e6:.1f} MB, built in {build_seconds:.2f} s")
        if not agent:
            print("note: no vminitd in this tree; a Python init printing a line stands in for the agent")
        phases = sorted(
            {p for t in timelines for p in t}, key=lambda p: statistics.median(t[p] for t in timelines)
        )
        guest = [p for p in phases if p.startswith("guest-")]
        host = [p for p in phases if p not in guest]
        for title, group in (
            ("host phase (s since QEMU's exec)", host),
            ("guest phase (s since the guest kernel started)", guest),
        ):
            if group:
                print(title)
            for phase in group:
                values = [t[phase] for t in timelines if phase in t]
                print(f"  {phase:<26}{statistics.median(values):>10.3f}")
        floor = statistics.median(floors)
        guest_ready = statistics.median(t[ready] for t in timelines)
        print(f"{'floor (exec to poweroff)':<28}{floor:>10.3f}")
        print(f"ratio {ready} / floor: {guest_ready / floor:.2f}")
        with_ports = statistics.median(t[ready] for t in pod_timelines)
        print(f"{ready + f' with {POD_PORTS} spare PCIe ports (pod VM)':<28}{with_ports:>10.3f}")
        print(f"ratio {ready} with / without spare ports: {with_ports / guest_ready:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/boot", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    asyncio.run(main_async(args.runs))


if __name__ == "__main__":
    main()
