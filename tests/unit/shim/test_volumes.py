"""Which bind mounts become volumes of the VM's share, and which fail the create with a sentence."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from spinbox.shim.volumes import Volume, VolumeError, volumes_of


def bind(destination: str, source: str | Path, *options: str, type_: str = "bind") -> dict[str, Any]:
    return {"destination": destination, "type": type_, "source": str(source), "options": list(options)}


def test_host_directories_and_files_become_volumes_in_mount_order(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("10.1.2.3 foo\n")
    spec = {
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            bind("/etc/hosts", hosts, "rbind", "rw"),
            {"destination": "/data", "source": str(tmp_path), "options": ["rbind", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
            bind("/one", tmp_path, "bind", "ro", "rprivate"),
        ]
    }
    volumes = volumes_of(spec, "c1")
    assert volumes.volumes == (
        Volume(str(hosts), read_only=False, recursive=True),
        Volume(str(tmp_path), read_only=True, recursive=True),
        Volume(str(tmp_path), read_only=True, recursive=False),
    )
    assert [(s.mount, s.volume) for s in volumes.shared] == [(1, 0), (2, 1), (4, 2)]


def test_a_spec_without_binds_needs_no_volumes() -> None:
    volumes = volumes_of({"mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}]}, "c1")
    assert volumes.volumes == () and volumes.shared == ()


def test_a_socket_bind_fails_with_a_sentence_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(
            VolumeError, match=rf"bind mount of {path} at /run/app.sock: the source is a socket"
        ):
            volumes_of({"mounts": [bind("/run/app.sock", path, "rbind")]}, "c1")


@pytest.mark.parametrize(
    ("mount", "problem"),
    [
        (bind("/dev/null", "/dev/null", "bind"), "at /dev/null: the source is a device node"),
        (bind("/gone", "/nonexistent/x", "bind"), "at /gone: cannot use its source: No such file"),
        (bind("/rel", "relative/dir", "bind"), "at /rel: its source is not an absolute host path"),
        (bind("/shared", "/tmp", "rbind", "rshared"), "at /shared: it asks for shared"),
    ],
)
def test_binds_a_vm_cannot_honour_fail(mount: dict[str, Any], problem: str) -> None:
    with pytest.raises(VolumeError, match=problem):
        volumes_of({"mounts": [mount]}, "c1")


def test_slave_propagation_is_kept_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        volumes = volumes_of({"mounts": [bind("/data", tmp_path, "rbind", "rslave")]}, "c7")
    assert len(volumes.volumes) == 1
    assert "container c7" in caplog.text and "do not reach the VM" in caplog.text
