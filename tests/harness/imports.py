"""What importing a part of spinbox loads, checked in a fresh interpreter:
each part (shim, spinboxctl, vminitd) may load only the code it needs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]

_LOAD = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
# A name bound to None in sys.modules is one whose import is refused, not a loaded module.
_PRINT = "print('\\n'.join(sorted(name for name, module in sys.modules.items() if module is not None)))\n"


def package_modules(package: str) -> list[str]:
    """Every module of a package in the source tree (its directory, not what it imports)."""
    directory = TOP.joinpath(*package.split("."))
    return sorted(
        f"{package}.{path.stem}" if path.stem != "__init__" else package for path in directory.glob("*.py")
    )


def loaded_by(modules: Sequence[str], path: Iterable[Path] = ()) -> set[str]:
    """The names in sys.modules after a fresh interpreter imports `modules`."""
    return loaded_after(_LOAD, modules, path)


def loaded_after(code: str, args: Sequence[str] = (), path: Iterable[Path] = ()) -> set[str]:
    """The modules loaded after a fresh interpreter runs `code` (with `args` in sys.argv[1:])."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TOP), *map(str, path)])
    result = subprocess.run(
        [sys.executable, "-c", "import sys\n" + code + _PRINT, *args],
        cwd=TOP,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"running {code!r} failed:\n{result.stderr}"
    return set(result.stdout.split())


def _within(name: str, packages: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def forbidden_loads(
    modules: Sequence[str],
    forbidden: Sequence[str] = (),
    only: Sequence[str] = (),
    within: str = "",
    path: Iterable[Path] = (),
) -> list[str]:
    """Modules that importing `modules` loads against the rules: any in (or under) `forbidden`,
    and, with `only`, any under the package `within` that is not in (or under) one of `only`."""
    loaded = loaded_by(modules, path)
    bad = {name for name in loaded if _within(name, forbidden)}
    if only:
        bad |= {
            name for name in loaded if name != within and _within(name, [within]) and not _within(name, only)
        }
    return sorted(bad)


def check_imports(
    part: str,
    modules: Sequence[str],
    forbidden: Sequence[str] = (),
    only: Sequence[str] = (),
    within: str = "",
    path: Iterable[Path] = (),
) -> None:
    """Fails naming what `part` loads that it must not."""
    bad = forbidden_loads(modules, forbidden, only, within, path)
    assert not bad, f"{part} loads modules it must not: {', '.join(bad)}"
