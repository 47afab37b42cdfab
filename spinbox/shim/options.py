"""The shim's command line, as containerd writes it (Go flag syntax: `-name value`)."""

from __future__ import annotations

import os
from dataclasses import dataclass


class UsageError(Exception):
    pass


@dataclass(frozen=True)
class ShimOptions:
    """The shim's command line, parsed."""

    namespace: str = ""
    address: str = ""  # containerd's gRPC socket
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    debug: bool = False
    version: bool = False
    info: bool = False
    help: bool = False
    action: str = ""  # "start", "delete" or "" (serve)
    socket: str = ""
    ttrpc_address: str = ""
    max_shim_version: int = 0  # 0: containerd did not say (1.6)


_VALUE_FLAGS = {
    "namespace": "namespace",
    "address": "address",
    "publish-binary": "publish_binary",
    "id": "id",
    "bundle": "bundle",
    "socket": "socket",  # the listener's path (the listener itself is fd 3)
    "debug-socket": "",
}
_BOOL_FLAGS = {
    "debug": "debug",
    "v": "version",
    "version": "version",
    "info": "info",
    "h": "help",
    "help": "help",
}

USAGE = """\
usage: containerd-shim-spinbox-v1 [-namespace NS] [-address ADDR] [-publish-binary BIN]
                                  [-id ID] [-bundle DIR] [-debug] [start | delete]
       containerd-shim-spinbox-v1 -v | --version | -h | --help

The containerd shim of the runtime io.containerd.spinbox.v1: containerd runs
it with `start` (the shim prints the address it serves the Task API on) and
`delete` (cleanup after a shim died); each task runs in a VM of spinboxd's.

Annotations on a container size its VM (overriding its OCI resources):
  io.spinbox.vcpus=N          virtual CPUs (1-255)
  io.spinbox.memory-mib=N     guest memory in MiB (192-1048576)
  io.spinbox.kernel-args=...  extra guest kernel arguments, separated by spaces
Other io.spinbox.* annotations are refused.
"""


def parse_args(argv: list[str], environ: dict[str, str] | None = None) -> ShimOptions:
    """Parses Go-style flags (`-flag value`, `--flag=value`, `-bool`), then one action."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    action = ""
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("-") and arg != "-":
            name, _, inline = arg.lstrip("-").partition("=")
            if name in _BOOL_FLAGS:
                if _BOOL_FLAGS[name]:
                    values[_BOOL_FLAGS[name]] = inline.lower() not in ("false", "0") if inline else True
            elif name in _VALUE_FLAGS:
                if not inline:
                    if not args:
                        raise UsageError(f"flag -{name} needs a value")
                    inline = args.pop(0)
                if _VALUE_FLAGS[name]:
                    values[_VALUE_FLAGS[name]] = inline
            else:
                raise UsageError(f"unknown flag {arg}")
        elif action:
            raise UsageError(f"unexpected argument {arg!r} after {action!r}")
        elif arg in ("start", "delete"):
            action = arg
        else:
            raise UsageError(f"unknown action {arg!r}; expected start or delete")
    namespace = str(values.get("namespace") or env.get("NAMESPACE", ""))
    max_version = env.get("MAX_SHIM_VERSION", "")
    return ShimOptions(
        namespace=namespace,
        address=str(values.get("address", "")),
        publish_binary=str(values.get("publish_binary", "")),
        id=str(values.get("id", "")),
        bundle=str(values.get("bundle", "")),
        debug=bool(values.get("debug", False)),
        version=bool(values.get("version", False)),
        info=bool(values.get("info", False)),
        help=bool(values.get("help", False)),
        action=action,
        socket=str(values.get("socket", "")),
        ttrpc_address=env.get("TTRPC_ADDRESS", ""),
        max_shim_version=int(max_version) if max_version.isdigit() else 0,
    )
