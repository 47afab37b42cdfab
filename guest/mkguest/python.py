"""The Python half of the guest image: the modules an entry point imports, as bytecode."""

from __future__ import annotations

import importlib.util
import marshal
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from modulefinder import ModuleFinder
from pathlib import Path
from typing import Any

from guest.mkguest.errors import BuildError

# Where things live on the host (Debian's layout) and in the image (the same).
STDLIB = Path(sysconfig.get_paths()["stdlib"])
DYNLOAD = Path(sysconfig.get_config_var("DESTSHARED") or STDLIB / "lib-dynload")
DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")

# Imported by the interpreter itself before any user code runs.
STARTUP_MODULES = (
    "encodings",
    "encodings.aliases",
    "encodings.utf_8",
    "encodings.ascii",
    "encodings.latin_1",
)

# Imported only behind try/except or for features the guest does not use; the
# first two alone would pull in OpenSSL. (ctypes and urllib stay in: vminitd
# calls mount, finit_module and reboot through ctypes, and pathlib imports urllib.parse.)
EXCLUDED_MODULES = (
    "ssl",
    "_ssl",
    "_hashlib",
    "tkinter",
    "_tkinter",
    "unittest",
    "doctest",
    "pdb",
    "pydoc",
    "pydoc_data",
    "idlelib",
    "lib2to3",
    "ensurepip",
    "distutils",
    "test",
    "sqlite3",
    "_sqlite3",
    "curses",
    "_curses",
    "readline",
    "_dbm",
    "_gdbm",
    "dbm",
    "lzma",
    "_lzma",
    "bz2",
    "_bz2",
    "xml",
    "email",
    "http",
    "xmlrpc",
    "ftplib",
    "smtplib",
    "imaplib",
    "poplib",
    "nntplib",
    "mailbox",
    "tarfile",
    "zipfile",
    "_decimal",
    "decimal",
    "multiprocessing",
    "concurrent.futures.process",
    "asyncio.__main__",
)


@dataclass(frozen=True)
class PythonFile:
    """A file of the image's Python: the image path and its bytes."""

    path: str
    data: bytes
    executable: bool = False


@dataclass(frozen=True)
class PythonSet:
    files: tuple[PythonFile, ...]
    modules: tuple[str, ...]
    extensions: tuple[Path, ...]  # host paths of .so modules (their libraries are needed too)


class _Finder(ModuleFinder):
    """ModuleFinder that also knows namespace packages (e.g. `google`), which it cannot find itself."""

    def __init__(self, path: list[str], excludes: list[str], namespaces: dict[str, list[str]]) -> None:
        super().__init__(path=path, excludes=excludes)
        self.namespaces = namespaces

    def import_module(self, partname: str, fqname: str, parent: Any) -> Any:
        if fqname in self.namespaces and fqname not in self.modules:
            module = self.add_module(fqname)
            module.__path__ = self.namespaces[fqname]  # type: ignore[attr-defined]
            if parent is not None:
                setattr(parent, partname, module)
            return module
        return super().import_module(partname, fqname, parent)


def _namespaces(packages: Iterable[str], search: list[str]) -> dict[str, list[str]]:
    """The namespace packages (directories without __init__.py) above the wanted packages."""
    found: dict[str, list[str]] = {}
    for package in packages:
        parts = package.split(".")
        for depth in range(1, len(parts)):
            name = ".".join(parts[:depth])
            dirs = [str(Path(r, *parts[:depth])) for r in search]
            dirs = [d for d in dirs if Path(d).is_dir() and not Path(d, "__init__.py").exists()]
            if dirs:
                found[name] = dirs
    return found


def find_modules(
    entry_module: str,
    packages: Iterable[str],
    roots: Iterable[Path],
    exclude_packages: Iterable[str] = (),
) -> dict[str, Path]:
    """Module name → host file for the entry module, whole packages, and all they import."""
    roots = list(roots)
    search = [str(p) for p in [*roots, STDLIB, DYNLOAD, DIST_PACKAGES]]
    excluded_packages = tuple(exclude_packages)
    packages = list(packages)
    finder = _Finder(search, [*EXCLUDED_MODULES, *excluded_packages], _namespaces(packages, search))
    wanted = [*STARTUP_MODULES, entry_module]
    for package in packages:
        wanted += _package_modules(package, search, excluded_packages)
    for name in wanted:
        try:
            finder.import_hook(name)
        except ImportError as error:
            raise BuildError(f"cannot find module {name} for the guest image: {error}") from None
    found: dict[str, Path] = {}
    for name, module in finder.modules.items():
        filename = getattr(module, "__file__", None)
        if filename and not _is_excluded(name, excluded_packages):
            found[name] = Path(filename)
    return found


def _is_excluded(name: str, excluded: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in excluded)


def _package_modules(package: str, search: list[str], excluded: tuple[str, ...]) -> list[str]:
    """Every module of a package (recursively), by walking its directory."""
    spec = None
    for root in search:
        candidate = Path(root, *package.split("."))
        if (candidate / "__init__.py").is_file():
            spec = candidate
            break
    if spec is None:
        raise BuildError(
            f"package {package} for the guest image is not installed (searched {', '.join(search)})"
        )
    names = []
    for path in sorted(spec.rglob("*")):
        if path.suffix not in (".py", ".so") or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(spec)
        stem = rel.name.split(".")[0]
        parts = [*rel.parts[:-1]] + ([] if stem == "__init__" else [stem])
        name = ".".join([package, *parts])
        if not _is_excluded(name, excluded):
            names.append(name)
    return names


def image_path(host: Path, roots: Iterable[Path]) -> str:
    """Where a host module file goes in the image (relative to /), sources becoming .pyc."""
    # The most specific directory first: lib-dynload is inside the stdlib.
    places = [(DYNLOAD, DYNLOAD), (STDLIB, STDLIB), *((r, DIST_PACKAGES) for r in roots)]
    places.append((DIST_PACKAGES, DIST_PACKAGES))
    for base, target in places:
        if host.is_relative_to(base):
            rel = host.relative_to(base)
            if rel.suffix == ".py":
                rel = rel.with_suffix(".pyc")
            return str(target / rel).lstrip("/")
    raise BuildError(f"module file {host} is outside the interpreter's and the packages' directories")


def compile_pyc(source: bytes, display_path: str) -> bytes:
    """Unchecked hash-based bytecode (PEP 552): the same bytes for the same source, on any host."""
    code = compile(source, display_path, "exec", dont_inherit=True, optimize=0)
    flags = 0b01  # hash-based, not checked against a source (there is none in the image)
    return (
        importlib.util.MAGIC_NUMBER
        + flags.to_bytes(4, "little")
        + importlib.util.source_hash(source)
        + marshal.dumps(code)
    )


def python_files(
    entry_module: str,
    packages: Iterable[str],
    roots: Iterable[Path],
    exclude_packages: Iterable[str] = (),
) -> PythonSet:
    roots = [root.resolve() for root in roots]
    found = find_modules(entry_module, packages, roots, exclude_packages)
    files: list[PythonFile] = []
    extensions: list[Path] = []
    for _name, host in sorted(found.items()):
        target = image_path(host, roots)
        if host.suffix == ".py":
            data = compile_pyc(host.read_bytes(), "/" + target[: -len("c")])
            files.append(PythonFile(target, data))
        else:
            files.append(PythonFile(target, host.read_bytes(), executable=True))
            extensions.append(host)
    return PythonSet(tuple(files), tuple(sorted(found)), tuple(extensions))
