"""kernel/build: a module-free spinbox guest kernel from Debian's linux-source-6.1.

Unpacks /usr/src/linux-source-6.1.tar.xz into build/kernel/, configures it as
`make tinyconfig` with kernel/spinbox.config merged over it
(scripts/kconfig/merge_config.sh), checks that every symbol of the fragment
kept its value, builds, and installs the kernel with its .config beside it
(config-<name> for vmlinuz-<name>, which spinbox-mkguest reads to see that the
kernel has no modules).

--format pvh (the default) installs the uncompressed ELF vmlinux, which QEMU
starts at its PVH entry point: no real-mode setup and no decompression.
--format bzimage installs the LZ4-compressed bzImage instead.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parent
FRAGMENT = HERE / "spinbox.config"
PACKAGES = HERE / "build-packages.txt"
SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
WORK = TOP / "build" / "kernel"
ARCH = "x86_64"
FORMATS = ("pvh", "bzimage")

_SET = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.+)$")
_UNSET = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")
_KCONFIG_SYMBOL = re.compile(r"^\s*(?:menu)?config\s+([A-Za-z0-9_]+)\s*$")


class BuildError(Exception):
    """A failure the user can act on; the message says what and how."""


def parse_config(text: str, name: str = "config") -> dict[str, str | None]:
    """Symbols (without CONFIG_) to values of a .config or fragment; None is "is not set".

    Raises BuildError naming the first line that is neither a setting, a comment nor empty,
    or a symbol set twice.
    """
    values: dict[str, str | None] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        set_match = _SET.match(line)
        unset_match = _UNSET.match(line)
        if set_match:
            symbol, value = set_match.group(1), set_match.group(2)
        elif unset_match:
            symbol, value = unset_match.group(1), None
        elif not line or line.startswith("#"):
            continue
        else:
            raise BuildError(f"{name}:{number}: not a kernel config line: {raw!r}")
        if symbol in values:
            raise BuildError(f"{name}:{number}: CONFIG_{symbol} is set twice")
        values[symbol] = value
    return values


def read_config(path: Path) -> dict[str, str | None]:
    try:
        return parse_config(path.read_text(), str(path))
    except FileNotFoundError:
        raise BuildError(f"{path} does not exist") from None


def kconfig_symbols(tree: Path) -> set[str]:
    """Every symbol defined by a Kconfig file of a kernel source tree."""
    symbols: set[str] = set()
    for path in tree.rglob("Kconfig*"):
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            match = _KCONFIG_SYMBOL.match(line)
            if match:
                symbols.add(match.group(1))
    return symbols


def lost_settings(fragment: dict[str, str | None], final: dict[str, str | None]) -> list[str]:
    """The fragment's settings that the final .config does not have, as sentences."""
    lost = []
    for symbol, wanted in fragment.items():
        got = final.get(symbol)
        if wanted == got:
            continue
        shown = "not set" if got is None else got
        lost.append(f"CONFIG_{symbol}: wanted {'not set' if wanted is None else wanted}, got {shown}")
    return lost


def run(argv: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(argv), flush=True)
    result = subprocess.run(argv, cwd=cwd, check=False)
    if result.returncode != 0:
        raise BuildError(f"{argv[0]} {' '.join(argv[1:3])} ... failed (exit status {result.returncode})")


def ensure_packages(listing: Path = PACKAGES) -> None:
    """apt-get installs whatever package of the listing is missing (as root), or says which are."""
    wanted = [
        line.strip() for line in listing.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    missing = []
    for package in wanted:
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
        )
        if status.returncode != 0 or "install ok installed" not in status.stdout:
            missing.append(package)
    if not missing:
        return
    if os.geteuid() != 0:
        raise BuildError(f"missing Debian packages: {' '.join(missing)} (apt install them, or run as root)")
    run(["apt-get", "install", "-y", "--no-install-recommends", *missing])


def unpack(source: Path, work: Path) -> Path:
    """The unpacked tree under work, unpacked again when the tarball changed."""
    if not source.is_file():
        raise BuildError(f"{source} does not exist: apt install linux-source-6.1")
    tree = work / source.name.removesuffix(".tar.xz")
    stamp = work / ".unpacked"
    identity = f"{source} {source.stat().st_size} {source.stat().st_mtime_ns}\n"
    if (tree / "Makefile").is_file() and stamp.is_file() and stamp.read_text() == identity:
        return tree
    if tree.exists():
        shutil.rmtree(tree)
    work.mkdir(parents=True, exist_ok=True)
    run(["tar", "-xf", str(source), "-C", str(work)])
    if not (tree / "Makefile").is_file():
        raise BuildError(f"{source} did not unpack into {tree}")
    stamp.write_text(identity)
    return tree


def make(tree: Path, obj: Path, *targets: str, jobs: int = 1) -> None:
    run(["make", "-C", str(tree), f"O={obj}", f"ARCH={ARCH}", f"-j{jobs}", *targets])


def configure(tree: Path, obj: Path, fragment: Path) -> dict[str, str | None]:
    """Writes obj/.config: tinyconfig, the fragment merged over it, olddefconfig."""
    wanted = read_config(fragment)
    unknown = sorted(set(wanted) - kconfig_symbols(tree))
    if unknown:
        raise BuildError(
            f"{fragment.name} names symbols this kernel source does not define: "
            + ", ".join(f"CONFIG_{symbol}" for symbol in unknown)
        )
    obj.mkdir(parents=True, exist_ok=True)
    make(tree, obj, "tinyconfig")
    merge = tree / "scripts/kconfig/merge_config.sh"
    run([str(merge), "-m", "-O", str(obj), str(obj / ".config"), str(fragment)], cwd=tree)
    make(tree, obj, "olddefconfig")
    lost = lost_settings(wanted, read_config(obj / ".config"))
    if lost:
        raise BuildError(
            f"{len(lost)} setting(s) of {fragment.name} did not survive olddefconfig "
            "(a missing dependency, or a symbol this kernel does not have):\n  " + "\n  ".join(lost)
        )
    return wanted


def kernel_release(tree: Path, obj: Path) -> str:
    result = subprocess.run(
        ["make", "-s", "-C", str(tree), f"O={obj}", f"ARCH={ARCH}", "kernelrelease"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip().splitlines()[-1] if result.returncode == 0 and result.stdout.strip() else "?"


def install(obj: Path, kind: str, output: Path) -> None:
    """The kernel at output, its .config as config-<name> beside it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    if kind == "pvh":
        # The symbol table is of no use to QEMU; the PVH note and the loadable segments stay.
        run(["objcopy", "--strip-all", str(obj / "vmlinux"), str(tmp)])
    else:
        shutil.copyfile(obj / "arch/x86/boot/bzImage", tmp)
    tmp.replace(output)
    name = output.name
    suffix = name.split("-", 1)[1] if name.startswith(("vmlinuz-", "vmlinux-")) else name
    shutil.copyfile(obj / ".config", output.with_name(f"config-{suffix}"))


@dataclass(frozen=True)
class Options:
    source: Path
    work: Path
    output: Path
    kind: str
    jobs: int
    fragment: Path
    install_packages: bool


def build(options: Options) -> None:
    start = time.monotonic()
    if options.install_packages:
        ensure_packages()
    tree = unpack(options.source, options.work)
    obj = options.work / f"obj-{options.kind}"
    configure(tree, obj, options.fragment)
    configured = time.monotonic()
    make(tree, obj, "vmlinux" if options.kind == "pvh" else "bzImage", jobs=options.jobs)
    built = time.monotonic()
    install(obj, options.kind, options.output)
    print(f"kernel: {options.output} ({kernel_release(tree, obj)}, {options.kind})")
    print(f"size: {options.output.stat().st_size / 1e6:.1f} MB")
    print(f"build: {built - configured:.0f} s with -j{options.jobs}; total {time.monotonic() - start:.0f} s")
    print(f'use it: [vm] kernel = "{options.output}" in /etc/spinbox/spinbox.toml, then')
    print(f"        spinbox-mkguest --kernel {options.output}")


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="kernel/build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--output", type=Path, help="where to install (default build/kernel/vmlinuz-spinbox)")
    parser.add_argument("--format", choices=FORMATS, default="pvh", dest="kind")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--source", type=Path, default=SOURCE, help=f"kernel tarball (default {SOURCE})")
    parser.add_argument("--work", type=Path, default=WORK, help=f"build directory (default {WORK})")
    parser.add_argument("--fragment", type=Path, default=FRAGMENT, help="config fragment")
    parser.add_argument("--no-install-packages", dest="install_packages", action="store_false",
                        help=f"do not apt-get install what {PACKAGES.name} lists")  # fmt: skip
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    output = args.output or args.work / "vmlinuz-spinbox"
    return Options(args.source.absolute(), args.work.absolute(), output.absolute(), args.kind, args.jobs,
                   args.fragment.absolute(), args.install_packages)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        build(options)
    except BuildError as error:
        print(f"kernel/build: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
