"""Which bind mounts become volumes of the VM's share, and which fail the create with a sentence."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from spinbox.mounts import Volume
from spinbox.shim.volumes import VolumeError, volumes_of


def bind(destination: str, source: str | Path, *options: str, type_: str = "bind") -> dict[str, Any]:
    return {"destination": destination, "type": type_, "source": str(source), "options": list(options)}


def no_submounts(tmp_path: Path) -> Path:
    mountinfo = tmp_path.parent / f"{tmp_path.name}.mountinfo"
    mountinfo.write_text("22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n")
    return mountinfo


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
    volumes = volumes_of(spec, "c1", no_submounts(tmp_path))
    assert volumes.volumes == (
        Volume(str(hosts), read_only=False, recursive=False),
        Volume(str(tmp_path), read_only=True, recursive=False),
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


def mountinfo_line(mount_id: int, parent: int, target: Path | str, options: str) -> str:
    escaped = str(target).replace(" ", "\\040")
    return (
        f"{mount_id} {parent} 0:{mount_id} / {escaped} {options},relatime shared:{mount_id} - tmpfs none rw\n"
    )


def test_each_host_mount_below_a_recursive_bind_is_a_volume_of_its_own_with_its_own_flags(
    tmp_path: Path,
) -> None:
    top = tmp_path / "host dir"
    for sub in ("tmpfs", "tmpfs/inner", "ro", "hidden", "file"):
        (top / sub).mkdir(parents=True)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        mountinfo_line(1, 0, "/", "rw")
        + mountinfo_line(2, 1, top / "hidden", "rw")
        + mountinfo_line(3, 1, top / "tmpfs", "rw")
        + mountinfo_line(4, 3, top / "tmpfs/inner", "ro")
        + mountinfo_line(5, 1, top / "ro", "ro,nosuid")
        # Mounted over "hidden": the earlier mount there is out of sight.
        + mountinfo_line(6, 2, top / "hidden", "ro")
        + mountinfo_line(7, 1, tmp_path / "host dirt", "rw")
    )
    spec = {
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            bind("/mnt", top, "rbind", "ro", "rprivate"),
            bind("/flat", top, "bind", "ro"),
            bind("/last", tmp_path, "bind"),
        ]
    }
    volumes = volumes_of(spec, "c1", mountinfo)
    assert volumes.volumes == (
        Volume(str(top), read_only=True, recursive=False),
        Volume(str(top / "tmpfs"), read_only=False, recursive=False),
        Volume(str(top / "tmpfs/inner"), read_only=True, recursive=False),
        Volume(str(top / "ro"), read_only=True, recursive=False),
        Volume(str(top / "hidden"), read_only=True, recursive=False),
        Volume(str(top), read_only=True, recursive=False),
        Volume(str(tmp_path), read_only=False, recursive=False),
    )
    mounts = spec["mounts"]
    assert [(s.mount, s.volume) for s in volumes.shared] == [
        (1, 0),
        (2, 1),
        (3, 2),
        (4, 3),
        (5, 4),
        (6, 5),
        (7, 6),
    ]
    assert [(m["destination"], m["source"], m.get("options")) for m in mounts[2:6]] == [
        ("/mnt/tmpfs", str(top / "tmpfs"), ["bind", "rw"]),
        ("/mnt/tmpfs/inner", str(top / "tmpfs/inner"), ["bind", "ro"]),
        ("/mnt/ro", str(top / "ro"), ["bind", "ro"]),
        ("/mnt/hidden", str(top / "hidden"), ["bind", "ro"]),
    ]
    assert [m["destination"] for m in mounts] == [
        "/proc", "/mnt", "/mnt/tmpfs", "/mnt/tmpfs/inner", "/mnt/ro", "/mnt/hidden", "/flat", "/last"
    ]  # fmt: skip


def test_recursive_read_only_makes_every_mount_of_the_tree_read_only(tmp_path: Path) -> None:
    (tmp_path / "top/tmpfs").mkdir(parents=True)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(mountinfo_line(1, 0, "/", "rw") + mountinfo_line(2, 1, tmp_path / "top/tmpfs", "rw"))
    spec = {"mounts": [bind("/mnt", tmp_path / "top", "rbind", "rro", "rprivate")]}
    volumes = volumes_of(spec, "c1", mountinfo)
    assert [v.read_only for v in volumes.volumes] == [True, True]
    assert [m["options"] for m in spec["mounts"]] == [["rbind", "ro", "rprivate"], ["bind", "ro"]]


def test_a_host_mount_over_the_source_hides_the_mounts_below_it(tmp_path: Path) -> None:
    (tmp_path / "top/old").mkdir(parents=True)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        mountinfo_line(1, 0, "/", "rw")
        + mountinfo_line(2, 1, tmp_path / "top/old", "rw")
        + mountinfo_line(3, 1, tmp_path / "top", "rw")
    )
    spec = {"mounts": [bind("/mnt", tmp_path / "top", "rbind", "ro")]}
    assert len(volumes_of(spec, "c1", mountinfo).volumes) == 1
    assert len(spec["mounts"]) == 1
