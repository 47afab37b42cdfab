"""Assembling the guest image: files from the host's packages into a reproducible cpio."""

from __future__ import annotations

import gzip
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from guest.mkguest.check import can_check, check_imports
from guest.mkguest.cpio import Entry, write_newc
from guest.mkguest.errors import BuildError
from guest.mkguest.kmod import (
    AGENT_MODULES,
    KERNEL_PACKAGE,
    ON_DEMAND_MODULES,
    KernelModule,
    ModuleTree,
    module_indexes,
)
from guest.mkguest.python import python_files
from guest.vminitd.boot import DEFERRED_MARK

TOP = Path(__file__).resolve().parents[2]
DEFAULT_ENTRY = "guest.vminitd.__main__:main"
DEFAULT_PACKAGES = ("guest", "spinbox.ttrpc", "spinbox.api", "google.protobuf")
DEFAULT_EXCLUDE = ("guest.mkguest",)
PYTHON = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
MODULES_LIST = "etc/spinbox/modules"
COMPRESSIONS = ("none", "gzip", "zstd")

# Mount points and writable places that exist before vminitd mounts anything.
EMPTY_DIRS = ("dev", "proc", "sys", "run", "tmp", "mnt", "root", "etc", "var", "var/tmp")
# Nodes needed before devtmpfs is mounted: the kernel opens /dev/console for
# init's stdio, and Python reads /dev/urandom if getrandom() would block.
DEVICES = (("dev/console", 5, 1), ("dev/null", 1, 3), ("dev/urandom", 1, 9))


@dataclass(frozen=True)
class HostTool:
    path: Path
    package: str


BUSYBOX = HostTool(Path("/bin/busybox"), "busybox-static")
CRUN = HostTool(Path("/usr/bin/crun"), "crun")


@dataclass(frozen=True)
class ImageConfig:
    """Everything the image depends on; the same config on the same host gives the same bytes."""

    kernel_version: str
    entry: str = DEFAULT_ENTRY  # "module:function", called by /init
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    exclude_packages: tuple[str, ...] = DEFAULT_EXCLUDE
    roots: tuple[Path, ...] = (TOP,)  # where spinbox's own packages are found
    python: Path = PYTHON
    tools: tuple[HostTool, ...] = (BUSYBOX, CRUN)
    modules_root: Path = Path("/lib/modules")
    check: bool = True  # import the entry module inside the image before writing it (as root)
    compression: str = "none"  # fastest to boot under TCG (measured); gzip and zstd are smaller
    kernel_modules: bool = True  # False for a kernel built without modules (kmod.module_free)
    on_demand_modules: tuple[str, ...] = ON_DEMAND_MODULES  # carried, loaded when first used
    mtime: int = field(default_factory=lambda: int(os.environ.get("SOURCE_DATE_EPOCH", "0")))


@dataclass(frozen=True)
class BuildResult:
    output: Path
    size: int
    kernel_modules: tuple[str, ...]  # loaded at boot
    on_demand_modules: int  # carried for the kernel's request_module and containers' modprobe
    python_modules: int
    seconds: float
    checked: bool  # the entry module was imported inside the image (chroot)


class _Tree:
    """The image's files by path; directories are added for every parent."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> None:
        path = PurePosixPath(entry.path)
        for parent in reversed(path.parents[:-1]):
            self.entries.setdefault(str(parent), Entry.directory(str(parent)))
        self.entries[entry.path] = entry

    def add_host_file(self, host: Path, executable: bool = False) -> None:
        """Copy a host file to its canonical place (symlinked directories resolved)."""
        target = self.path_of(host)
        if target not in self.entries:
            perm = 0o755 if executable or os.access(host, os.X_OK) else 0o644
            self.add(Entry.file(target, Path(os.path.realpath(host)).read_bytes(), perm))

    def path_of(self, host: Path) -> str:
        """Where add_host_file put `host`."""
        return str(Path(os.path.realpath(host.parent)) / host.name).lstrip("/")

    def sorted(self) -> list[Entry]:
        return [self.entries[key] for key in sorted(self.entries, key=lambda p: PurePosixPath(p).parts)]


def shared_libraries(binaries: Iterable[Path]) -> list[Path]:
    """The shared libraries (and the dynamic loader) that binaries need, by ldd."""
    names = [str(b) for b in binaries]
    if not names:
        return []
    result = subprocess.run(["ldd", *names], capture_output=True, text=True, check=False)
    libraries: set[str] = set()
    for line in result.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            raise BuildError(f"shared library {line.split()[0]} is not installed (needed by the guest image)")
        match = re.match(r"^(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)$", line)
        if match:
            libraries.add(match.group(1))
    return [Path(p) for p in sorted(libraries)]


def _init_script(python: Path, entry: str) -> bytes:
    module, _, function = entry.partition(":")
    return (
        f"#!{python} -SI\n"
        "# spinbox guest init: the agent is PID 1.\n"
        "import sys\n"
        "sys.path.append('/usr/lib/python3/dist-packages')\n"
        f"from {module} import {function or 'main'}\n"
        f"{function or 'main'}()\n"
    ).encode()


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "none":
        return data
    if compression == "gzip":
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(data)
        return out.getvalue()
    if compression == "zstd":
        try:
            return subprocess.run(
                ["zstd", "-q", "-c", "-10", "-T1", "--no-check"], input=data, capture_output=True, check=True
            ).stdout
        except FileNotFoundError:
            raise BuildError("zstd is not installed: apt install zstd (or use --compression gzip)") from None
    raise BuildError(f"unknown compression {compression!r}: use one of {', '.join(COMPRESSIONS)}")


def build(config: ImageConfig, output: Path) -> BuildResult:
    start = time.monotonic()
    tree = _Tree()
    modules = _kernel_modules(config)
    for name in EMPTY_DIRS:
        tree.add(Entry.directory(name, 0o1777 if name.endswith("tmp") else 0o755))
    for path, major, minor in DEVICES:
        tree.add(Entry.char_device(path, major, minor, 0o600 if path == "dev/console" else 0o666))
    # Debian's merged /usr: /bin, /lib, ... are links into /usr.
    for name in ("bin", "sbin", "lib", "lib64"):
        host = Path("/") / name
        if host.is_symlink():
            tree.add(Entry.symlink(name, os.readlink(host)))

    if not config.python.is_file():
        raise BuildError(f"{config.python} does not exist: apt install python3-minimal")
    binaries = [config.python]
    tree.add_host_file(config.python, executable=True)
    tree.add(Entry.symlink("usr/bin/python3", config.python.name))
    for tool in config.tools:
        if not tool.path.is_file():
            raise BuildError(f"{tool.path} does not exist: apt install {tool.package}")
        tree.add_host_file(tool.path, executable=True)
        binaries.append(tool.path)

    module, _, _ = config.entry.partition(":")
    pyset = python_files(module, config.packages, config.roots, config.exclude_packages)
    for pyfile in pyset.files:
        tree.add(Entry.file(pyfile.path, pyfile.data, 0o755 if pyfile.executable else 0o644))
    binaries += pyset.extensions
    for library in shared_libraries(binaries):
        tree.add_host_file(library)

    loaded: list[str] = []
    listing: list[str] = []
    modules_dir = f"{'usr/' if 'lib' in tree.entries else ''}lib/modules/{config.kernel_version}"
    for ko in modules:
        tree.add(Entry.file(f"{modules_dir}/{ko.path}", ko.data))
    if modules:
        with tempfile.TemporaryDirectory(prefix="spinbox-mkguest-") as scratch:
            indexes = module_indexes(
                ModuleTree(config.modules_root / config.kernel_version), modules, Path(scratch)
            )
        for name, data in indexes.items():
            tree.add(Entry.file(f"{modules_dir}/{name}", data))
        if BUSYBOX in config.tools:
            # The kernel's request_module runs /sbin/modprobe (kernel.modprobe) in the guest's root.
            sbin = "usr/sbin" if "sbin" in tree.entries else "sbin"
            tree.add(Entry.symlink(f"{sbin}/modprobe", "/" + tree.path_of(BUSYBOX.path)))
    boot_modules = [ko for ko in modules if ko.at_boot]
    for ko in sorted(boot_modules, key=lambda ko: not ko.early):  # stable: dependency order kept
        image_path = f"lib/modules/{config.kernel_version}/{ko.path}"
        if not ko.early and len(listing) == len(loaded):
            listing.append(f"{DEFERRED_MARK}: not needed to serve the agent")
        loaded.append("/" + image_path)
        listing.append("/" + image_path)
    tree.add(Entry.file(MODULES_LIST, "".join(f"{line}\n" for line in listing).encode()))
    tree.add(Entry.file("init", _init_script(Path("/usr/bin") / config.python.name, config.entry), 0o755))

    entries = tree.sorted()
    checked = config.check and can_check()
    if checked:
        check_imports(entries, f"/usr/bin/{config.python.name}", module)
    raw = io.BytesIO()
    write_newc(raw, entries, config.mtime)
    image = _compress(raw.getvalue(), config.compression)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_bytes(image)
    os.chmod(tmp, 0o644)
    tmp.replace(output)
    seconds = time.monotonic() - start
    on_demand = len(modules) - len(boot_modules)
    return BuildResult(output, len(image), tuple(loaded), on_demand, len(pyset.modules), seconds, checked)


def _kernel_modules(config: ImageConfig) -> list[KernelModule]:
    if not config.kernel_modules:
        return []
    modules_dir = config.modules_root / config.kernel_version
    if not modules_dir.is_dir():
        raise BuildError(
            f"kernel modules {modules_dir} do not exist: install the kernel's package "
            f"(apt install {KERNEL_PACKAGE} for Debian's cloud kernel)"
        )
    kernel = ModuleTree(modules_dir)
    early = set(kernel.resolve(required=AGENT_MODULES, optional=()))
    at_boot = kernel.resolve()
    on_demand = [
        m for m in kernel.resolve(required=(), optional=config.on_demand_modules) if m not in at_boot
    ]
    return [kernel.load(relative, relative in early) for relative in at_boot] + [
        kernel.load(relative, early=False, at_boot=False) for relative in on_demand
    ]


def kernel_version_of(kernel: Path) -> str:
    """The version in /boot/vmlinuz-<version>."""
    name = kernel.name
    if not name.startswith("vmlinuz-"):
        raise BuildError(f"cannot tell the kernel version of {kernel}: use --kernel-version")
    return name[len("vmlinuz-") :]
