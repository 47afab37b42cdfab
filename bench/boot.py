"""bench/boot: how long spinbox's guest takes to boot, against a floor measured in the same run.

The floor is the same kernel, machine and devices booting a trivial init
(busybox-static's shell running `poweroff -f`): what no guest image can beat.
The guest is the real image (vminitd) booted until its agent answers Ping; until
vminitd exists, a Python init that prints a line on the console stands in.

Variants booted in the same run, interleaved and in rotated order so that load
on the machine hits all alike: `--kernel PATH` (repeatable) compares kernels
(each gets its own image, with no modules for a kernel built without them);
`--compare-tree DIR` an image built from another checkout's guest sources
(`--compare-tree-qemu`: also with that checkout's base kernel arguments and
firmware, i.e. a before/after of the whole boot); `--compare-args ARGS` extra
kernel arguments; `--compare-qemu ARGS` extra QEMU arguments.

With the agent, the first variant is also saved as a template (as spinboxd
does with vm.boot = "template") and VMs restored from it are timed from QEMU's
exec to agent-ready (entropy and clock refreshed), against the same floor.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOP))

from guest.mkguest.cpio import Entry, write_newc  # noqa: E402
from guest.mkguest.image import BUSYBOX, ImageConfig, build, kernel_version_of  # noqa: E402
from guest.mkguest.kmod import module_free  # noqa: E402
from spinbox.daemon.templates import TEMPLATE_PORTS  # noqa: E402
from spinbox.shim.create import POD_HOTPLUG_PORTS  # noqa: E402
from spinbox.vm import VmSpec, choose_accel, default_kernel, launch, qemu, template  # noqa: E402

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


def build_guest(work: Path, kernel: Path, tree: Path = TOP, name: str = "") -> tuple[Path, bool, float]:
    """The image to measure with `kernel` (its Python from `tree`), whether it has the agent,
    and the build's seconds."""
    kernel_version = kernel_version_of(kernel)
    modules = not module_free(kernel)
    output = work / (name or f"initrd-{kernel_version}.img")
    if (tree / "guest" / "vminitd" / "__main__.py").is_file():
        config = ImageConfig(kernel_version=kernel_version, roots=(tree,), kernel_modules=modules)
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


@dataclass(frozen=True)
class Variant:
    """One configuration to boot: a guest image, extra kernel arguments, extra QEMU arguments."""

    name: str
    kernel: Path
    image: Path
    kernel_args: tuple[str, ...] = ()
    qemu_args: tuple[str, ...] = ()
    # Another tree's spinbox/vm/qemu.py: its base kernel arguments and firmware replace this tree's.
    qemu_py: Path | None = None
    # Spare PCIe ports, as a pod's VM has for its later containers' disks.
    hotplug_ports: int = 0


@contextlib.contextmanager
def qemu_defaults(qemu_py: Path | None) -> Iterator[None]:
    """This tree's QEMU command line with another tree's base kernel arguments and firmware choice."""
    if qemu_py is None:
        yield
        return
    names: dict[str, object] = {}
    for node in ast.parse(qemu_py.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name == "BASE_KERNEL_ARGS":
                names[name] = ast.literal_eval(node.value)
            elif name == "QBOOT":
                names[name] = qemu.QBOOT
    saved = (qemu.BASE_KERNEL_ARGS, qemu.QBOOT)
    qemu.BASE_KERNEL_ARGS = names.get("BASE_KERNEL_ARGS", saved[0])  # type: ignore[assignment]
    qemu.QBOOT = names.get("QBOOT", Path("/nonexistent"))  # type: ignore[assignment]
    try:
        yield
    finally:
        qemu.BASE_KERNEL_ARGS, qemu.QBOOT = saved


def spec(image: Path, run_dir: Path, variant: Variant) -> VmSpec:
    return VmSpec(
        vm_id="bench",
        kernel=variant.kernel,
        initrd=image,
        runtime_dir=run_dir,
        kernel_args=variant.kernel_args,
        extra_args=variant.qemu_args,
        hotplug_ports=variant.hotplug_ports,
    )


async def boot_floor(image: Path, run_dir: Path, variant: Variant) -> float:
    with qemu_defaults(variant.qemu_py):
        vm = await launch(spec(image, run_dir, variant))
    try:
        await asyncio.wait_for(vm.wait_exit(), 300)
        return time.monotonic() - vm.state.stamps["exec"]
    finally:
        await vm.kill()


async def boot_guest(variant: Variant, run_dir: Path, agent: bool) -> dict[str, float]:
    with qemu_defaults(variant.qemu_py):
        vm = await launch(spec(variant.image, run_dir, variant), start=False)
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


def template_spec(variant: Variant, run_dir: Path, vm_id: str) -> VmSpec:
    return VmSpec(
        vm_id=vm_id,
        kernel=variant.kernel,
        initrd=variant.image,
        runtime_dir=run_dir,
        kernel_args=variant.kernel_args,
        hotplug_ports=TEMPLATE_PORTS,
    )


async def restore_guest(
    files: template.TemplateFiles, ram: int, variant: Variant, run_dir: Path
) -> dict[str, float]:
    vm = await template.restore(template_spec(variant, run_dir, "bench"), files, ram, None)
    try:
        timeline = await vm.wait_ready(300)
        await vm.shutdown(30)
        return timeline
    finally:
        await vm.kill()


def _row(title: str, cells: list[str], width: int) -> str:
    return f"{title:<48}" + "".join(f"{cell:>{width}}" for cell in cells)


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}" if values else "-"


async def main_async(
    runs: int,
    kernels: list[Path],
    compare_tree: Path | None,
    compare_args: list[tuple[str, ...]],
    compare_qemu: list[tuple[str, ...]],
    with_qemu: bool,
) -> None:
    with tempfile.TemporaryDirectory(prefix="spinbox-bench-") as tmp:
        work = Path(tmp)
        floor_image = work / "floor.img"
        build_floor(floor_image)
        kernel = kernels[0]
        builds = [build_guest(work, k) for k in kernels]
        agent = builds[0][1]
        variants = [Variant("this tree", kernel, builds[0][0])]
        for other_kernel, (other_image, _, _) in zip(kernels[1:], builds[1:], strict=True):
            variants.append(Variant(f"this tree with {other_kernel}", other_kernel, other_image))
        if compare_tree is not None:
            other, other_agent, _ = build_guest(work, kernel, compare_tree, "compare.img")
            if other_agent != agent:
                raise SystemExit(f"bench/boot: {compare_tree} and this tree differ in having vminitd")
            variants.append(Variant(f"image of {compare_tree}", kernel, other))
            qemu_py = compare_tree / "spinbox" / "vm" / "qemu.py"
            if with_qemu and qemu_py.is_file():
                name = f"image of {compare_tree}, its kernel arguments and firmware"
                variants.append(Variant(name, kernel, other, qemu_py=qemu_py))
        for args in compare_args:
            variants.append(Variant(f"kernel arguments + {' '.join(args)}", kernel, builds[0][0], args))
        for args in compare_qemu:
            variants.append(Variant(f"QEMU + {' '.join(args)}", kernel, builds[0][0], qemu_args=args))
        name = f"pod VM ({POD_HOTPLUG_PORTS} spare ports)"
        variants.append(Variant(name, kernel, builds[0][0], hotplug_ports=POD_HOTPLUG_PORTS))
        ready = "agent-ready" if agent else "init-ready"
        # A floor for each variant whose machine or kernel differs from the first's.
        has_floor = [
            v is variants[0]
            or v.kernel != kernel
            or bool(v.kernel_args or v.qemu_args or v.qemu_py or v.hotplug_ports)
            for v in variants
        ]
        floors: list[list[float]] = [[] for _ in variants]
        timelines: list[list[dict[str, float]]] = [[] for _ in variants]
        restores: list[dict[str, float]] = []
        # A template's RAM lives on tmpfs, as spinboxd keeps it.
        shm = tempfile.TemporaryDirectory(prefix="spinbox-bench-template-", dir="/dev/shm")
        files = template.TemplateFiles(Path(shm.name))
        ram = -1
        if agent:
            await template.build(template_spec(variants[0], work / "run", "bench-template"), files, None, 300)
            ram = template.load_ram(files)  # sealed, as spinboxd hands it to restored VMs
        order = list(range(len(variants)))
        for run in range(runs):  # interleaved and rotated, so load on the machine hits all alike
            shift = run % len(order)
            for index in order[shift:] + order[:shift]:
                variant = variants[index]
                if has_floor[index]:
                    floors[index].append(await boot_floor(floor_image, work / "run", variant))
                timelines[index].append(await boot_guest(variant, work / "run", agent))
                if agent and index == 0:
                    restores.append(await restore_guest(files, ram, variant, work / "run"))
        shm.cleanup()
        if ram >= 0:
            os.close(ram)
        print(f"accelerator: {choose_accel('auto')}  runs: {runs} (medians)")
        if not agent:
            print("note: no vminitd in this tree; a Python init printing a line stands in for the agent")
        for index, variant in enumerate(variants):
            size = variant.image.stat().st_size / 1e6
            print(f"v{index + 1}: {variant.name} (kernel {variant.kernel}, image {size:.1f} MB)")
        width = 10
        header = [f"v{i + 1}" for i in range(len(variants))]
        everything = [t for per_variant in timelines for t in per_variant]
        phases = sorted(
            {p for t in everything for p in t},
            key=lambda p: statistics.median(t[p] for t in everything if p in t),
        )
        guest = [p for p in phases if p.startswith("guest-")]
        host = [p for p in phases if p not in guest]
        for title, group in (
            ("host phase (s since QEMU's exec)", host),
            ("guest phase (s since the guest kernel started)", guest),
        ):
            if group:
                print(_row(title, header, width))
            for phase in group:
                cells = [_median([t[phase] for t in per_variant if phase in t]) for per_variant in timelines]
                print(_row(f"  {phase}", cells, width))
        print(_row("floor (exec to poweroff)", [_median(values) for values in floors], width))
        own_floors = [values or floors[0] for values in floors]
        ratios = [
            statistics.median(t[ready] for t in per_variant) / statistics.median(values)
            for per_variant, values in zip(timelines, own_floors, strict=True)
        ]
        print(_row(f"ratio {ready} / floor", [f"{r:.2f}" for r in ratios], width))
        if restores:
            print(f"v1 restored from a template ({TEMPLATE_PORTS} spare ports), s since QEMU's exec:")
            for phase in ("qmp-up", "restored", "refreshed", "agent-ready"):
                print(_row(f"  {phase}", [_median([t[phase] for t in restores])], width))
            restore_s = statistics.median(t["agent-ready"] for t in restores)
            print(
                _row(
                    "ratio restore agent-ready / v1 floor",
                    [f"{restore_s / statistics.median(floors[0]):.2f}"],
                    width,
                )
            )
            cold_s = statistics.median(t["agent-ready"] for t in timelines[0])
            print(_row("ratio restore / cold boot agent-ready", [f"{restore_s / cold_s:.2f}"], width))
        # Boots of one run are close in time: their differences shed most of the machine's load swings.
        for phase in (ready, "guest-first-request"):
            if len(variants) > 1 and all(phase in t for per_variant in timelines for t in per_variant):
                diffs = [
                    _median([t[phase] - t0[phase] for t, t0 in zip(per_variant, timelines[0], strict=True)])
                    for per_variant in timelines
                ]
                print(_row(f"{phase} minus v1's in the same run", diffs, width))
        if compare_tree is not None:
            print("note: an older tree's guest-exec may be PID 1's fork, not the exec of /init")


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/boot", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--kernel",
        type=Path,
        action="append",
        help="a guest kernel to measure (repeatable; default: the newest Debian cloud kernel)",
    )
    parser.add_argument(
        "--compare-tree",
        type=Path,
        help="also boot an image built from this checkout's guest sources (e.g. a worktree of main)",
    )
    parser.add_argument(
        "--compare-args",
        action="append",
        default=[],
        help="also boot this tree's image with these extra kernel arguments (may be repeated)",
    )
    parser.add_argument(
        "--compare-qemu",
        action="append",
        default=[],
        help="also boot this tree's image with these QEMU arguments appended, e.g. '-cpu qemu64'",
    )
    parser.add_argument(
        "--compare-tree-qemu",
        action="store_true",
        help="with --compare-tree, also boot that tree's image with its base kernel arguments and firmware",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    kernels = [kernel.absolute() for kernel in args.kernel or [default_kernel()]]
    for kernel in kernels:
        if not kernel.is_file():
            parser.error(f"kernel {kernel} does not exist")
    asyncio.run(
        main_async(
            args.runs,
            kernels,
            args.compare_tree and args.compare_tree.resolve(),
            [tuple(a.split()) for a in args.compare_args],
            [tuple(a.split()) for a in args.compare_qemu],
            args.compare_tree_qemu,
        )
    )


if __name__ == "__main__":
    main()
