"""Host files for bind mounts arrive with CreateContainer: vminitd writes each
into the container's own directory and makes it its mount's source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guest.vminitd import validate
from guest.vminitd.containers import Containers, RuntimeConfig
from guest.vminitd.spec import write_bind_files
from spinbox.api.proto import agent_pb2 as pb


def containers(tmp_path: Path) -> Containers:
    config = RuntimeConfig(state_dir=tmp_path / "state", rootfs_dir=tmp_path / "rootfs")
    return Containers(config, reaper=None)  # type: ignore[arg-type]


def spec() -> dict[str, Any]:
    return {
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/etc/hosts",
                "type": "bind",
                "source": "/host/hosts",
                "options": ["rbind", "ro"],
            },
            {"destination": "/etc/resolv.conf", "source": "/host/resolv", "options": ["bind"]},
        ]
    }


def test_bind_files_become_the_sources_of_their_mounts(tmp_path: Path) -> None:
    c = containers(tmp_path)
    doc = spec()
    files = [
        pb.BindFile(mount=1, content=b"10.1.2.3 foo\n", mode=0o640, uid=1000, gid=1001),
        pb.BindFile(mount=2, content=b""),
    ]
    write_bind_files(c.binds, "c1", doc, files)
    hosts = Path(doc["mounts"][1]["source"])
    assert hosts.is_relative_to(tmp_path / "state" / "binds" / "c1")
    assert hosts.read_bytes() == b"10.1.2.3 foo\n"
    info = hosts.stat()
    assert (info.st_mode & 0o7777, info.st_uid, info.st_gid) == (0o640, 1000, 1001)
    assert doc["mounts"][1]["options"] == ["rbind", "ro"]
    assert Path(doc["mounts"][2]["source"]).read_bytes() == b""
    assert doc["mounts"][0]["source"] == "proc"


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ([pb.BindFile(mount=3, content=b"x")], "no such mount"),
        ([pb.BindFile(mount=0, content=b"x")], "not a bind mount"),
        ([pb.BindFile(mount=1), pb.BindFile(mount=1)], "given twice"),
    ],
)
def test_bind_files_that_match_no_bind_mount_are_refused(
    tmp_path: Path, files: list[pb.BindFile], problem: str
) -> None:
    with pytest.raises(validate.InvalidRequest, match=problem):
        write_bind_files(containers(tmp_path).binds, "c1", spec(), files)
