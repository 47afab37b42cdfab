"""bench/boot: how long spinbox's guest takes to boot, against a floor measured in the same run.

The floor is the same kernel, machine and devices booting a trivial init
(busybox-static's shell running `poweroff -f`): what no guest image can beat.
The guest is the real image (vminitd) booted until its agent answers Ping; until
vminitd exists, a Python init that prints a line on the console stands in.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import logging
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
from guest.mkguest.image import BUSYBOX, ImageConfig, build  # noqa: E402
from spinbox.vm import VmSpec, choose_accel, default_kernel, launch, qemu  # noqa: E402

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


def build_guest(work: Path, tree: Path = TOP, name: str = "initrd.img") -> tuple[Path, bool, float]:
    """The image to measure (its Python from `tree`), whether it has the agent, and the build's seconds."""
    kernel_version = default_kernel().name.removeprefix("vmlinuz-")
    output = work / name
    if (tree / "guest" / "vminitd" / "__main__.py").is_file():
        config = ImageConfig(kernel_version=kernel_version, roots=(tree,))
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


@dataclass(frozen=True)
class Variant:
    """One configuration to boot: a guest image, extra kernel arguments, extra QEMU arguments."""

    name: str
    image: Path
    kernel_args: tuple[str, ...] = ()
    qemu_args: tuple[str, ...] = ()
    # Another tree's spinbox/vm/qemu.py: its base kernel arguments and firmware replace this tree's.
    qemu_py: Path | None = None


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


def spec(image: Path, run_dir: Path, variant: Variant | None = None) -> VmSpec:
    return VmSpec(
        vm_id="bench",
        kernel=default_kernel(),
        initrd=image,
        runtime_dir=run_dir,
        kernel_args=variant.kernel_args if variant else (),
        extra_args=variant.qemu_args if variant else (),
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


async def main_async(
    runs: int,
    compare_tree: Path | None,
    compare_args: list[tuple[str, ...]],
    compare_qemu: list[tuple[str, ...]],
    with_qemu: bool,
) -> None:
    with tempfile.TemporaryDirectory(prefix="spinbox-bench-") as tmp:
        work = Path(tmp)
        floor_image = work / "floor.img"
        build_floor(floor_image)
        image, agent, build_seconds = build_guest(work)
        variants = [Variant("this tree", image)]
        if compare_tree is not None:
            other, other_agent, _ = build_guest(work, compare_tree, "compare.img")
            if other_agent != agent:
                raise SystemExit(f"bench/boot: {compare_tree} and this tree differ in having vminitd")
            variants.append(Variant(f"tree {compare_tree}", other))
            qemu_py = compare_tree / "spinbox" / "vm" / "qemu.py"
            if with_qemu and qemu_py.is_file():
                variants.append(Variant(f"tree {compare_tree} + its QEMU", other, qemu_py=qemu_py))
        for args in compare_args:
            variants.append(Variant(f"+ {' '.join(args)}", image, args))
        for args in compare_qemu:
            variants.append(Variant(f"qemu {' '.join(args)}", image, qemu_args=args))
        ready = "agent-ready" if agent else "init-ready"
        floors: dict[str, list[float]] = {
            v.name: [] for v in variants if v.kernel_args or v.qemu_args or v.qemu_py or v is variants[0]
        }
        timelines: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
        for run in range(runs):  # interleaved and rotated, so load on the machine hits every variant alike
            for variant in variants[run % len(variants) :] + variants[: run % len(variants)]:
                if variant.name in floors:
                    floors[variant.name].append(await boot_floor(floor_image, work / "run", variant))
                timelines[variant.name].append(await boot_guest(variant, work / "run", agent))
        accel = choose_accel("auto")
        print(f"kernel: {default_kernel()}  accelerator: {accel}  runs: {runs} (medians)")
        print(f"image: {image.stat().st_size / 1e6:.1f} MB, built in {build_seconds:.2f} s")
        if not agent:
            print("note: no vminitd in this tree; a Python init printing a line stands in for the agent")
        first = timelines[variants[0].name]
        phases = sorted({p for t in first for p in t}, key=lambda p: statistics.median(t[p] for t in first))
        phases += sorted({p for v in variants for t in timelines[v.name] for p in t} - set(phases))
        guest = [p for p in phases if p.startswith("guest-")]
        host = [p for p in phases if p not in guest]
        width = max(12, *(len(v.name) for v in variants))
        print(f"{'':<28}" + "".join(f"{v.name:>{width + 2}}" for v in variants))

        def row(label: str, values: list[list[float]]) -> None:
            cells = (f"{statistics.median(v):.3f}" if v else "-" for v in values)
            print(f"{label:<28}" + "".join(f"{c:>{width + 2}}" for c in cells))

        for title, group in (
            ("host phase (s since QEMU's exec)", host),
            ("guest phase (s since the guest kernel started)", guest),
        ):
            if group:
                print(title)
            for phase in group:
                row(f"  {phase}", [[t[phase] for t in timelines[v.name] if phase in t] for v in variants])
        row("floor (exec to poweroff)", [floors.get(v.name, []) for v in variants])
        floor = statistics.median(floors[variants[0].name])
        for variant in variants:
            guest_ready = statistics.median(t[ready] for t in timelines[variant.name])
            own_floor = statistics.median(floors.get(variant.name) or [floor])
            print(f"ratio {ready} / floor ({variant.name}): {guest_ready / own_floor:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/boot", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
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
    asyncio.run(
        main_async(
            args.runs,
            args.compare_tree and args.compare_tree.resolve(),
            [tuple(a.split()) for a in args.compare_args],
            [tuple(a.split()) for a in args.compare_qemu],
            args.compare_tree_qemu,
        )
    )


if __name__ == "__main__":
    main()
