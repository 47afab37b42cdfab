"""OCI hooks that run on the host: split from the guest's spec, run with the
container's state on stdin, failures named."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from spinbox.shim.hooks import HookError, run_hooks, split_hooks, state_json


def test_host_hooks_leave_the_guest_spec() -> None:
    spec = {
        "hooks": {
            "createRuntime": [
                {"path": "/usr/bin/nerdctl", "args": ["nerdctl", "internal", "oci-hook", "createRuntime"]}
            ],
            "createContainer": [{"path": "/bin/true"}],
            "poststop": [{"path": "/bin/true", "timeout": 5}],
        }
    }
    host, guest = split_hooks(spec)
    assert [h.args for h in host.create_runtime] == [("nerdctl", "internal", "oci-hook", "createRuntime")]
    assert host.poststop[0].timeout == 5
    assert guest["hooks"] == {"createContainer": [{"path": "/bin/true"}]}
    assert "hooks" in spec and len(spec["hooks"]) == 3
    _, bare = split_hooks({"hooks": {"prestart": [{"path": "/bin/true"}]}})
    assert "hooks" not in bare


@pytest.mark.parametrize(
    ("hooks", "message"),
    [
        ({"prestart": [{"path": "relative"}]}, 'needs an absolute "path"'),
        ({"poststart": [{"path": "/bin/true", "timeout": 0}]}, "not a positive number"),
        ({"poststop": {"path": "/bin/true"}}, "must be a list"),
    ],
)
def test_malformed_hooks_are_refused(hooks: dict[str, object], message: str) -> None:
    with pytest.raises(HookError, match=message):
        split_hooks({"hooks": hooks})


def test_hook_gets_state_args_and_env(tmp_path: Path) -> None:
    out = tmp_path / "seen"
    # busybox picks its applet from argv[0], so this also shows that args[0] is argv[0].
    command = f'echo "$0 $1 $GREETING" > {out}; cat >> {out}'
    hook = {"path": "/bin/busybox", "args": ["sh", "-c", command, "my-hook", "one"], "env": ["GREETING=hi"]}
    spec = {"ociVersion": "1.0.2", "annotations": {"a": "b"}, "hooks": {"createRuntime": [hook]}}
    host, _ = split_hooks(spec)
    state = state_json(spec, "c1", "creating", 4242, "/run/bundle")
    asyncio.run(run_hooks("createRuntime", host.create_runtime, state, fatal=True))
    first, rest = out.read_text().split("\n", 1)
    assert first == "my-hook one hi"
    assert json.loads(rest) == {
        "ociVersion": "1.0.2",
        "id": "c1",
        "status": "creating",
        "pid": 4242,
        "bundle": "/run/bundle",
        "annotations": {"a": "b"},
    }


def test_failing_hook_is_named_when_fatal_and_logged_otherwise(tmp_path: Path) -> None:
    spec = {"hooks": {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "echo no network >&2; exit 4"]}]}}
    host, _ = split_hooks(spec)
    with pytest.raises(HookError, match="prestart hook /bin/sh exited 4: no network"):
        asyncio.run(run_hooks("prestart", host.prestart, b"{}", fatal=True))
    asyncio.run(run_hooks("prestart", host.prestart, b"{}", fatal=False))
