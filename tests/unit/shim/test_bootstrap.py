"""The shim binary's command line and the address `start` prints per containerd version."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from spinbox.shim.bootstrap import format_address, group_id, read_annotations, server_argv, socket_path
from spinbox.shim.options import UsageError, parse_args


def test_parses_containerd_flags_and_environment() -> None:
    argv = [
        "-namespace", "default", "-address", "/run/containerd/containerd.sock",
        "-publish-binary", "/usr/bin/containerd", "-id", "t1", "-debug", "start",
    ]  # fmt: skip
    env = {"TTRPC_ADDRESS": "/run/containerd/containerd.sock.ttrpc", "MAX_SHIM_VERSION": "3"}
    options = parse_args(argv, env)
    assert options.namespace == "default"
    assert options.address == "/run/containerd/containerd.sock"
    assert options.id == "t1"
    assert options.debug
    assert options.action == "start"
    assert options.ttrpc_address.endswith(".ttrpc")
    assert options.max_shim_version == 3


def test_namespace_from_environment_and_version_flag() -> None:
    assert parse_args(["--version"], {}).version
    assert parse_args(["-v"], {}).version
    assert parse_args(["-id=x", "delete"], {"NAMESPACE": "k8s.io"}).namespace == "k8s.io"
    assert parse_args([], {}).action == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-bogus"], "unknown flag -bogus"),
        (["-id"], "flag -id needs a value"),
        (["run"], "unknown action 'run'"),
        (["start", "delete"], "unexpected argument"),
    ],
)
def test_rejects_bad_command_lines(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_args(argv, {})


def test_containerd_1_6_gets_a_plain_address() -> None:
    path = Path("/run/containerd/s/abc")
    assert format_address(path, 0) == "unix:///run/containerd/s/abc"


@pytest.mark.parametrize(("max_version", "printed"), [(2, 2), (3, 3), (4, 3)])
def test_newer_containerd_gets_json_bootstrap_params(max_version: int, printed: int) -> None:
    text = format_address(Path("/run/containerd/s/abc"), max_version)
    assert json.loads(text) == {
        "version": printed,
        "address": "unix:///run/containerd/s/abc",
        "protocol": "ttrpc",
    }


def test_socket_path_is_short_and_stable() -> None:
    long_id = "x" * 200
    first = socket_path("/run/containerd/containerd.sock", "default", long_id)
    assert first == socket_path("/run/containerd/containerd.sock", "default", long_id)
    assert len(str(first)) < 108
    assert first != socket_path("/run/containerd/containerd.sock", "other", long_id)


def test_pod_containers_share_their_sandbox_shim(tmp_path: Path) -> None:
    spec = {
        "annotations": {
            "io.kubernetes.cri.sandbox-id": "pod1",
            "io.kubernetes.cri.container-type": "container",
        }
    }
    (tmp_path / "config.json").write_text(json.dumps(spec))
    annotations = read_annotations(tmp_path)
    assert group_id("c1", annotations) == "pod1"
    assert group_id("c1", {}) == "c1"
    assert read_annotations(tmp_path / "missing") == {}


def test_the_server_runs_under_the_shims_own_name(tmp_path: Path) -> None:
    """Through the installed script, ps shows containerd-shim-spinbox-v1 (not python3 -m spinbox.shim)."""
    options = parse_args(["-namespace", "default", "-id", "u1", "-address", "/run/c.sock"], {})
    script = tmp_path / "containerd-shim-spinbox-v1"
    script.write_text("#!/usr/bin/python3\nimport sys\n")
    argv = server_argv(options, tmp_path / "s.sock", invoked_as=str(script))
    assert argv[:6] == [sys.executable, str(script), "-namespace", "default", "-id", "u1"]
    # Run any other way (python3 -m spinbox.shim, a shell wrapper), the module is run.
    assert server_argv(options, tmp_path / "s.sock", invoked_as="/x/spinbox/shim/__main__.py")[1:3] == [
        "-m",
        "spinbox.shim",
    ]
    wrapper = tmp_path / "w" / "containerd-shim-spinbox-v1"
    wrapper.parent.mkdir()
    wrapper.write_text('#!/bin/sh\nexec python3 -m spinbox.shim "$@"\n')
    assert server_argv(options, tmp_path / "s.sock", invoked_as=str(wrapper))[1] == "-m"
