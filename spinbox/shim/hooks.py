"""OCI hooks that run on the host rather than in the guest.

createRuntime, prestart (its deprecated twin), poststart and poststop are
about the runtime's own namespaces, which for spinbox are the host's; they
run here with the container's state on stdin and are taken out of the spec
the guest receives. createContainer and startContainer stay in it: they run
in the container's namespaces, inside the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

HOST_HOOKS = ("createRuntime", "prestart", "poststart", "poststop")
DEFAULT_TIMEOUT = 120.0


class HookError(Exception):
    pass


@dataclass(frozen=True)
class Hook:
    """One OCI hook: the program, its arguments, environment and timeout."""

    path: str
    args: tuple[str, ...]
    env: tuple[str, ...]
    timeout: float | None

    @classmethod
    def parse(cls, stage: str, raw: object) -> Hook:
        if (
            not isinstance(raw, dict)
            or not isinstance(raw.get("path"), str)
            or not raw["path"].startswith("/")
        ):
            raise HookError(f'a {stage} hook needs an absolute "path"')
        timeout = raw.get("timeout")
        if timeout is not None and (not isinstance(timeout, int) or timeout <= 0):
            raise HookError(f"the {stage} hook {raw['path']} has a timeout that is not a positive number")
        return cls(
            path=raw["path"],
            args=tuple(str(a) for a in raw.get("args") or [raw["path"]]),
            env=tuple(str(e) for e in raw.get("env") or []),
            timeout=float(timeout) if timeout else None,
        )


@dataclass(frozen=True)
class HostHooks:
    """The OCI hooks the shim runs on the host, by stage."""

    create_runtime: tuple[Hook, ...] = ()
    prestart: tuple[Hook, ...] = ()
    poststart: tuple[Hook, ...] = ()
    poststop: tuple[Hook, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.create_runtime or self.prestart or self.poststart or self.poststop)


def split_hooks(spec: dict[str, Any]) -> tuple[HostHooks, dict[str, Any]]:
    """The host hooks of a spec, and a copy of the spec without them."""
    hooks = spec.get("hooks") or {}
    if not isinstance(hooks, dict):
        raise HookError('"hooks" in config.json must be an object')

    def stage(name: str) -> tuple[Hook, ...]:
        entries = hooks.get(name) or []
        if not isinstance(entries, list):
            raise HookError(f"hooks.{name} in config.json must be a list")
        return tuple(Hook.parse(name, entry) for entry in entries)

    host = HostHooks(stage("createRuntime"), stage("prestart"), stage("poststart"), stage("poststop"))
    guest_spec = dict(spec)
    remaining = {k: v for k, v in hooks.items() if k not in HOST_HOOKS}
    if remaining:
        guest_spec["hooks"] = remaining
    else:
        guest_spec.pop("hooks", None)
    return host, guest_spec


def state_json(spec: dict[str, Any], container_id: str, status: str, pid: int, bundle: str) -> bytes:
    state = {
        "ociVersion": spec.get("ociVersion", "1.0.2"),
        "id": container_id,
        "status": status,
        "pid": pid,
        "bundle": bundle,
        "annotations": spec.get("annotations") or {},
    }
    return json.dumps(state).encode()


async def run_hook(hook: Hook, state: bytes) -> None:
    try:
        process = await asyncio.create_subprocess_exec(
            hook.args[0],
            *hook.args[1:],
            executable=hook.path,
            env=dict(e.split("=", 1) for e in hook.env if "=" in e),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as error:
        raise HookError(f"cannot run hook {hook.path}: {error.strerror}") from error
    try:
        async with asyncio.timeout(hook.timeout or DEFAULT_TIMEOUT):
            output, _ = await process.communicate(state)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise HookError(
            f"hook {hook.path} did not finish within {hook.timeout or DEFAULT_TIMEOUT:g}s"
        ) from None
    if process.returncode != 0:
        detail = output.decode(errors="replace").strip()[-500:]
        raise HookError(f"hook {hook.path} exited {process.returncode}" + (f": {detail}" if detail else ""))


async def run_hooks(stage: str, hooks: tuple[Hook, ...], state: bytes, *, fatal: bool) -> None:
    for hook in hooks:
        try:
            await run_hook(hook, state)
        except HookError as error:
            if fatal:
                raise HookError(f"{stage} {error}") from None
            log.warning("%s %s", stage, error)
