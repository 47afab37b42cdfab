"""Boot a VM for debugging: `python -m spinbox.vm --initrd IMAGE` prints its console and timeline."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
from pathlib import Path

from spinbox.vm.console import follow_console
from spinbox.vm.errors import VmError
from spinbox.vm.machine import launch
from spinbox.vm.spec import DEFAULT_IMAGE, VmSpec, default_kernel


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m spinbox.vm", description=__doc__)
    parser.add_argument("--kernel", type=Path, help="guest kernel (default: the newest Debian cloud kernel)")
    parser.add_argument("--initrd", type=Path, default=DEFAULT_IMAGE, help="guest image (spinbox-mkguest)")
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--memory", type=int, default=256, help="MiB")
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    parser.add_argument("--append", action="append", default=[], help="extra kernel argument")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the agent")
    parser.add_argument(
        "--until-exit", action="store_true", help="don't wait for an agent: wait until the guest powers off"
    )
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    kernel = args.kernel or default_kernel()
    with tempfile.TemporaryDirectory(prefix="spinbox-vm-") as tmp:
        spec = VmSpec(
            vm_id="debug",
            kernel=kernel,
            initrd=args.initrd,
            runtime_dir=Path(tmp) / "vm",
            vcpus=args.vcpus,
            memory_mib=args.memory,
            kernel_args=tuple(args.append),
            accel=args.accel,
        )
        vm = await launch(spec, start=False)

        def show(chunk: bytes) -> None:
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()

        console = asyncio.ensure_future(follow_console(vm.console_socket, show))
        await asyncio.sleep(0)
        try:
            await vm.resume()
            if args.until_exit:
                async with asyncio.timeout(args.timeout):
                    status = await vm.wait_exit()
                print(f"\nQEMU exited with status {status}", file=sys.stderr)
            else:
                await vm.wait_ready(args.timeout)
                await vm.shutdown(10)
        finally:
            await vm.kill()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await console
        for phase, seconds in vm.timeline.items():
            print(f"{phase:>24}  {seconds:7.3f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except VmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
