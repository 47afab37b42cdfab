"""The shim binary. containerd runs it as
`containerd-shim-spinbox-v1 -namespace NS -address ADDR -publish-binary BIN -id ID
[-bundle DIR] [-debug] start|delete`
and the long-lived server is the same binary with no action, its listener on fd 3.

Imports are kept to the standard library until an action needs more:
`start` runs once per container and its start-up time is the user's wait.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spinbox.shim.options import ShimOptions


def main(argv: list[str] | None = None) -> int:
    os.umask(0o022)
    put_off_imports()
    from spinbox.shim.options import USAGE, UsageError, parse_args

    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as error:
        print(f"containerd-shim-spinbox-v1: {error}\n\n{USAGE}", file=sys.stderr, end="")
        return 2
    if options.help:
        print(USAGE, end="")
        return 0
    if options.info:
        # containerd 2.x asks runtimes for their features; spinbox has no options to report.
        print("containerd-shim-spinbox-v1: -info is not supported", file=sys.stderr)
        return 2
    if options.version:
        from spinbox import __version__

        print(f"containerd-shim-spinbox-v1:\n  Version: {__version__}\n  Runtime: io.containerd.spinbox.v1")
        return 0
    return run(options)


def run(options: ShimOptions) -> int:
    if options.action == "start":
        from spinbox.shim.bootstrap import start

        return start(options)
    if options.action == "delete":
        from spinbox.shim.cleanup import delete

        return delete(options)
    return server_entry()(options)


# What the long-lived server's libraries import but it never uses: asyncio
# imports ssl for TLS (libssl and libcrypto, about 5 MiB in every shim), and
# carries on without it: it catches the ImportError.
SERVER_NEVER_IMPORTS = ("ssl",)
# What they import but use only on paths a serving shim seldom takes: asyncio and
# dataclasses import inspect (with ast and dis, about 1 MiB) for debug-mode checks,
# the repr of a callback in an error's log line, or a dataclass without a docstring.
# It loads on the first use of one of its names.
SERVER_LOADS_ON_USE = ("inspect",)


class LoadedOnUse(types.ModuleType):
    """Stands for a module until one of its names is first used, then is that module."""

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        module = importlib.import_module(self.__name__)
        vars(self).update(vars(module))
        return getattr(module, name)


def put_off_imports() -> None:
    """SERVER_LOADS_ON_USE stood for until used (before anything imports them)."""
    for name in SERVER_LOADS_ON_USE:
        if name not in sys.modules:
            sys.modules[name] = LoadedOnUse(name)


def server_entry() -> Callable[[ShimOptions], int]:
    """The server's entry point, its modules loaded without SERVER_NEVER_IMPORTS and with
    SERVER_LOADS_ON_USE put off."""
    for name in SERVER_NEVER_IMPORTS:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # importing it raises ImportError
    put_off_imports()
    from spinbox.shim.server import serve

    return serve


if __name__ == "__main__":
    sys.exit(main())
