"""Request validation: every refusal is a sentence naming the problem."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from guest.vminitd import validate
from guest.vminitd.validate import InvalidRequest


def spec(**process: object) -> bytes:
    proc = {"args": ["/bin/sh"], "cwd": "/", "env": ["PATH=/bin"]}
    proc.update(process)
    return json.dumps({"ociVersion": "1.0.2", "process": proc, "root": {"path": "rootfs"}}).encode()


@pytest.mark.parametrize("value", ["a", "abc-123", "x.y_z+1", "A" * 128, "0" * 64])
def test_good_ids(value: str) -> None:
    assert validate.container_id(value) == value


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "empty"),
        ("a" * 129, "129 characters"),
        ("../etc", "characters"),
        ("a/b", "characters"),
        ("-a", "start"),
        ("a b", "characters"),
        ("a\0", "characters"),
    ],
)
def test_bad_ids(value: str, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        validate.container_id(value)


def test_exec_id_may_be_empty_for_init() -> None:
    assert validate.exec_id("") == ""
    with pytest.raises(InvalidRequest, match="exec id"):
        validate.exec_id("../x")


def test_signal_range() -> None:
    assert validate.signal_number(15) == 15
    for bad in (0, 65, 1000):
        with pytest.raises(InvalidRequest, match=f"signal {bad}"):
            validate.signal_number(bad)


def test_window_size() -> None:
    assert validate.window_size(80, 24) == (80, 24)
    with pytest.raises(InvalidRequest, match="0x24"):
        validate.window_size(0, 24)
    with pytest.raises(InvalidRequest, match="65536"):
        validate.window_size(65536, 1)


def test_serial_and_subdir() -> None:
    assert validate.serial("layer-0") == "layer-0"
    for bad in ("", "a" * 21, "a/b", "x y"):
        with pytest.raises(InvalidRequest, match="serial"):
            validate.serial(bad)
    assert validate.subdir("/a/./b/") == "a/b"
    with pytest.raises(InvalidRequest, match="inside"):
        validate.subdir("a/../../b")


def test_a_good_spec_parses() -> None:
    doc = validate.spec(spec())
    assert doc["process"]["args"] == ["/bin/sh"]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"process": {"args": ["x"]}}', "ociVersion"),
        (b"x" * (validate.MAX_SPEC + 1), "at most"),
        (spec(args=[]), "args must be a non-empty list"),
        (spec(args="sh"), "args must be a non-empty list"),
        (spec(args=[""]), "empty"),
        (spec(cwd="relative"), "not an absolute path"),
        (spec(env=["NOEQUALS"]), "NAME=value"),
        (spec(user={"uid": -1}), "uid"),
    ],
)
def test_bad_specs(data: bytes, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        validate.spec(data)


def test_bad_mounts() -> None:
    doc = json.loads(spec())
    doc["mounts"] = [{"destination": "relative", "type": "tmpfs"}]
    with pytest.raises(InvalidRequest, match=r"mounts\[0\].destination"):
        validate.spec(json.dumps(doc).encode())


def make_rootfs(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    busybox = root / "bin" / "busybox"
    busybox.write_text("#!/bin/true\n")
    busybox.chmod(0o755)
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "usr" / "bin").mkdir(parents=True)
    # An absolute link must resolve inside the rootfs, not on the host.
    (root / "usr" / "bin" / "env").symlink_to("/bin/busybox")
    (root / "usr" / "bin" / "true").symlink_to("/usr/lib/nothing")


def test_executable_lookup(tmp_path: Path) -> None:
    make_rootfs(tmp_path)
    root = os.fspath(tmp_path)
    proc = {"args": ["sh"], "env": ["PATH=/usr/bin:/bin"], "cwd": "/"}
    assert validate.executable_in_rootfs(root, proc) == "/bin/sh"
    assert validate.executable_in_rootfs(root, {**proc, "args": ["/usr/bin/env"]}) == "/usr/bin/env"
    assert validate.executable_in_rootfs(root, {**proc, "args": ["true"]}) is None
    assert validate.executable_in_rootfs(root, {**proc, "args": ["nonexistent"]}) is None
    assert (
        validate.executable_in_rootfs(root, {**proc, "args": ["../../bin/sh"], "cwd": "/usr/bin"}) is not None
    )
