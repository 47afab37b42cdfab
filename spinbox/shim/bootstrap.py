"""`start`: bind the shim's socket, launch the long-lived server, print the address.

This path runs for every container before containerd can go on, so it
imports only the standard library.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

import spinbox
from spinbox.shim.cri import SANDBOX_ID_ANNOTATION
from spinbox.shim.options import ShimOptions

# Overridable for tests and benchmarks that run beside a real containerd.
SOCKET_DIR = Path(os.environ.get("SPINBOX_SHIM_SOCKET_DIR", "/run/containerd/s"))
# The highest task API version spinbox serves (containerd.task.v3.Task).
SHIM_VERSION = 3
# The directory holding the spinbox package `start` runs from.
PACKAGE_ROOT = Path(spinbox.__file__).resolve().parent.parent


class StartError(Exception):
    pass


def group_id(container_id: str, annotations: dict[str, str]) -> str:
    """The shim a container belongs to: its pod's sandbox, or itself."""
    sandbox = annotations.get(SANDBOX_ID_ANNOTATION, "")
    return sandbox or container_id


def socket_path(containerd_address: str, namespace: str, group: str) -> Path:
    """A short, stable path per (containerd, namespace, group): unix socket
    paths must stay under 108 bytes whatever the ids are."""
    digest = hashlib.sha256(f"{containerd_address}/{namespace}/{group}".encode()).hexdigest()
    return SOCKET_DIR / digest


def format_address(path: Path, max_shim_version: int) -> str:
    """What `start` prints: containerd 1.6 parses only a plain address; 1.7
    (MAX_SHIM_VERSION=2) and 2.x (3) take JSON bootstrap parameters and use the
    task API of the version named there."""
    address = f"unix://{path}"
    if max_shim_version < 2:
        return address
    version = min(max_shim_version, SHIM_VERSION)
    return json.dumps({"version": version, "address": address, "protocol": "ttrpc"})


def read_annotations(bundle: Path) -> dict[str, str]:
    try:
        with open(bundle / "config.json", "rb") as file:
            spec = json.load(file)
    except (OSError, ValueError):
        return {}
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    return {str(k): str(v) for k, v in annotations.items()} if isinstance(annotations, dict) else {}


def can_connect(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def bind_listener(path: Path) -> socket.socket | None:
    """A listening socket at `path`, or None when a live shim already listens there."""
    path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    for _ in range(2):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
        except OSError as error:
            listener.close()
            if error.errno != errno.EADDRINUSE:
                raise StartError(f"cannot bind the shim socket {path}: {error.strerror or error}") from error
            if can_connect(path):
                return None
            # A shim that died left its socket behind.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        os.chmod(path, 0o600)
        listener.listen(128)
        return listener
    raise StartError(f"cannot bind the shim socket {path}: it keeps reappearing")


SHIM_NAME = "containerd-shim-spinbox-v1"


def server_command(invoked_as: str) -> list[str]:
    """How the server is run: through the shim's own script when containerd ran
    that (so ps and systemctl status show containerd-shim-spinbox-v1, as they
    show containerd-shim-runc-v2), else as `python3 -m spinbox.shim`."""
    script = Path(invoked_as)
    if script.name == SHIM_NAME and script.is_absolute():
        try:
            with script.open("rb") as f:
                first = f.readline(256)
        except OSError:
            first = b""
        if first.startswith(b"#!") and b"python" in first:
            return [sys.executable, str(script)]
    return [sys.executable, "-m", "spinbox.shim"]


def server_argv(options: ShimOptions, path: Path, invoked_as: str | None = None) -> list[str]:
    argv = [
        *server_command(sys.argv[0] if invoked_as is None else invoked_as),
        "-namespace", options.namespace,
        "-id", options.id,
        "-address", options.address,
        "-publish-binary", options.publish_binary,
        "-socket", str(path),
    ]  # fmt: skip
    if options.bundle:
        argv += ["-bundle", options.bundle]
    if options.debug:
        argv.append("-debug")
    return argv


def spawn_server(options: ShimOptions, listener: socket.socket, path: Path) -> int:
    """Starts the server in its own session with the listener as fd 3 and
    /dev/null as stdio: containerd waits for all of `start`'s output to end."""
    fd = listener.fileno()
    actions: list[tuple[object, ...]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
    ]
    if fd == 3:
        os.set_inheritable(fd, True)
    else:
        actions.append((os.POSIX_SPAWN_DUP2, fd, 3))
    argv = server_argv(options, path)
    env = server_environment(os.environ)
    return os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)


def server_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`start`'s environment, with the directory this spinbox was imported from first
    on PYTHONPATH: the server runs the same code whatever containerd's environment
    holds (a packaged spinbox lives outside python3's own module path)."""
    env = dict(environ)
    root = str(PACKAGE_ROOT)
    rest = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry and entry != root]
    env["PYTHONPATH"] = os.pathsep.join([root, *rest])
    return env


def start(options: ShimOptions) -> int:
    bundle = Path(options.bundle or os.getcwd())
    group = group_id(options.id, read_annotations(bundle))
    path = socket_path(options.address, options.namespace, group)
    try:
        listener = bind_listener(path)
        if listener is not None:
            with listener:
                spawn_server(options, listener, path)
        # containerd 1.6 reloads a shim after its own restart from this file.
        (bundle / "address").write_text(f"unix://{path}")
    except (StartError, OSError) as error:
        print(f"containerd-shim-spinbox-v1: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(format_address(path, options.max_shim_version))
    sys.stdout.flush()
    return 0
