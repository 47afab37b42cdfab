"""Checks on everything the host sends. Each failure is a sentence naming the problem."""

from __future__ import annotations

import os
import re
from typing import Any

MAX_ID = 128
MAX_SPEC = 1 << 20
MAX_SERIAL = 20  # virtio-blk serials are at most 20 bytes
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_SERIAL = re.compile(r"[A-Za-z0-9_.-]+")
MAX_SIGNAL = 64


class InvalidRequest(ValueError):
    """A request the agent refuses; the message says why."""


def container_id(value: str) -> str:
    return _check_id(value, "container id")


def exec_id(value: str) -> str:
    """An exec id; empty names the container's init process."""
    return value if value == "" else _check_id(value, "exec id")


def _check_id(value: str, what: str) -> str:
    if not value:
        raise InvalidRequest(f"the {what} is empty")
    if len(value) > MAX_ID:
        raise InvalidRequest(f"the {what} is {len(value)} characters long; at most {MAX_ID} are allowed")
    if not _ID.fullmatch(value):
        raise InvalidRequest(
            f"the {what} {value!r} has characters other than letters, digits and _ . + - "
            "(or does not start with a letter or digit)"
        )
    return value


def serial(value: str) -> str:
    if not value or len(value) > MAX_SERIAL or not _SERIAL.fullmatch(value):
        raise InvalidRequest(f"block device serial {value!r} is not 1-{MAX_SERIAL} letters, digits, _ . -")
    return value


def subdir(value: str) -> str:
    """A relative path inside a filesystem, without '..'."""
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in parts or "\0" in value:
        raise InvalidRequest(f"subdir {value!r} must stay inside its filesystem")
    return "/".join(parts)


def signal_number(value: int) -> int:
    if not 1 <= value <= MAX_SIGNAL:
        raise InvalidRequest(f"signal {value} is not between 1 and {MAX_SIGNAL}")
    return value


def window_size(width: int, height: int) -> tuple[int, int]:
    if not (0 < width <= 0xFFFF and 0 < height <= 0xFFFF):
        raise InvalidRequest(f"window size {width}x{height} is not between 1x1 and 65535x65535")
    return width, height


def json_object(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_SPEC:
        raise InvalidRequest(f"the {what} is {len(data)} bytes; at most {MAX_SPEC} are allowed")
    if not data:
        raise InvalidRequest(f"the {what} is empty")
    import json  # here: only container requests need it, and the agent's boot does not wait for it

    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"the {what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"the {what} is not a JSON object")
    return value


def process(value: Any, where: str = "process") -> dict[str, Any]:
    """Checks an OCI process object enough that crun's errors are about the container, not the form."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} is missing or not an object")
    args = value.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise InvalidRequest(f"{where}.args must be a non-empty list of strings")
    if not args[0]:
        raise InvalidRequest(f"{where}.args[0] (the program to run) is empty")
    cwd = value.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise InvalidRequest(f"{where}.cwd {cwd!r} is not an absolute path")
    env = value.get("env", [])
    if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
        raise InvalidRequest(f"{where}.env must be a list of NAME=value strings")
    user = value.get("user", {})
    if not isinstance(user, dict):
        raise InvalidRequest(f"{where}.user is not an object")
    for key in ("uid", "gid"):
        if not isinstance(user.get(key, 0), int) or user.get(key, 0) < 0:
            raise InvalidRequest(f"{where}.user.{key} is not a non-negative integer")
    return value


def spec(data: bytes) -> dict[str, Any]:
    """Parses and checks an OCI runtime spec (config.json)."""
    doc = json_object(data, "OCI spec")
    version = doc.get("ociVersion")
    if not isinstance(version, str) or not version:
        raise InvalidRequest("the OCI spec has no ociVersion")
    process(doc.get("process"), "the OCI spec's process")
    for key in ("linux", "root", "annotations", "hooks"):
        if key in doc and not isinstance(doc[key], dict):
            raise InvalidRequest(f"the OCI spec's {key} is not an object")
    mounts = doc.get("mounts", [])
    if not isinstance(mounts, list):
        raise InvalidRequest("the OCI spec's mounts is not a list")
    for i, m in enumerate(mounts):
        if not isinstance(m, dict) or not isinstance(m.get("destination"), str):
            raise InvalidRequest(f"the OCI spec's mounts[{i}] has no destination")
        if not m["destination"].startswith("/"):
            raise InvalidRequest(
                f"the OCI spec's mounts[{i}].destination {m['destination']!r} is not absolute"
            )
    return doc


def resources(data: bytes) -> dict[str, Any]:
    return json_object(data, "resources")


def executable_in_rootfs(rootfs: str, proc: dict[str, Any]) -> str | None:
    """The program `proc` runs, as a path in the rootfs, or None when it is not there.

    Symlinks resolve inside the rootfs, so an absolute link does not point at the guest's own files.
    """
    program: str = proc["args"][0]
    if "/" in program:
        candidates = [program if program.startswith("/") else os.path.join(proc.get("cwd", "/"), program)]
    else:
        path = next(
            (e[5:] for e in proc.get("env", []) if e.startswith("PATH=")), "/usr/sbin:/usr/bin:/sbin:/bin"
        )
        candidates = [os.path.join(d, program) for d in path.split(":") if d.startswith("/")]
    for candidate in candidates:
        resolved = _resolve_in(rootfs, candidate)
        if resolved is not None and os.path.isfile(resolved) and os.access(resolved, os.X_OK):
            return candidate
    return None


def resolve_in(root: str, path: str) -> str | None:
    """`path` of the rootfs `root` with its symlinks resolved inside it (a path under `root`)."""
    return _resolve_in(root, path)


def _resolve_in(root: str, path: str, depth: int = 0) -> str | None:
    if depth > 40:
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    current = root
    for i, part in enumerate(parts):
        if part == "..":
            current = current if current == root else os.path.dirname(current)
            continue
        nxt = os.path.join(current, part)
        if os.path.islink(nxt):
            target = os.readlink(nxt)
            rest = "/".join(parts[i + 1 :])
            base = "/" if target.startswith("/") else "/" + os.path.relpath(current, root)
            return _resolve_in(root, os.path.join(base, target, rest), depth + 1)
        current = nxt
    return current if os.path.lexists(current) else None
