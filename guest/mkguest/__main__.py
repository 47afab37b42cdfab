"""spinbox-mkguest: build the guest image (initrd.img) from the host's Debian packages."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from guest.mkguest.errors import BuildError
from guest.mkguest.image import COMPRESSIONS, ImageConfig, build, kernel_version_of
from guest.mkguest.kmod import module_free
from spinbox.config import CONFIG_PATH, ConfigError, load
from spinbox.vm.errors import VmError
from spinbox.vm.spec import DEFAULT_IMAGE, check_kernel, default_kernel


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="spinbox-mkguest", description=__doc__)
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_IMAGE, help=f"where to write (default {DEFAULT_IMAGE})"
    )
    kernel = parser.add_mutually_exclusive_group()
    kernel.add_argument(
        "--kernel",
        type=Path,
        help="the guest kernel, /boot/vmlinuz-<version> (default: [vm] kernel of the configuration, "
        "else the newest Debian cloud kernel)",
    )
    kernel.add_argument(
        "--kernel-version", help="the guest kernel's version (its modules are in /lib/modules)"
    )
    parser.add_argument("--compression", choices=COMPRESSIONS, default="none")
    parser.add_argument(
        "--no-check", action="store_true", help="skip importing the entry module inside the image (a chroot)"
    )
    parser.add_argument(
        "--config", type=Path, default=CONFIG_PATH, help=f"spinbox's configuration (default {CONFIG_PATH})"
    )
    return parser.parse_args(argv)


def configured_kernel(path: Path) -> Path | None:
    """[vm] kernel of spinbox's configuration, when it names one."""
    kernel = load(path).vm.kernel
    return Path(kernel) if kernel else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.kernel_version:
            version = args.kernel_version
            kernel = Path("/boot") / f"vmlinuz-{version}"
        else:
            kernel = args.kernel or configured_kernel(args.config) or default_kernel()
            check_kernel(kernel)
            version = kernel_version_of(kernel)
        modules = not module_free(kernel)
        config = ImageConfig(
            kernel_version=version,
            compression=args.compression,
            kernel_modules=modules,
            check=not args.no_check,
        )
        result = build(config, args.output)
    except (BuildError, VmError, ConfigError) as error:
        print(f"spinbox-mkguest: {error}", file=sys.stderr)
        return 1
    print(f"kernel: {kernel} ({version})")
    on_demand = f", {result.on_demand_modules} more on demand" if result.on_demand_modules else ""
    builtin = "" if modules else " (built without modules)"
    print(f"kernel modules: {len(result.kernel_modules)}{on_demand}{builtin}")
    checked = "imports checked inside the image" if result.checked else "imports not checked (needs root)"
    print(f"python modules: {result.python_modules} ({checked})")
    size = f"{result.size / 1e6:.1f} MB, {args.compression}"
    print(f"image: {result.output} ({size}), built in {result.seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
