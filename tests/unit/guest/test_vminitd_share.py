"""The host's volumes become the sources of the container's bind mounts in the guest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guest.vminitd import validate
from guest.vminitd.share import Share
from spinbox.api.proto import agent_pb2 as pb


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
            {"destination": "/data", "source": "/host/data", "options": ["bind"]},
        ]
    }


def share(tmp_path: Path) -> Share:
    s = Share(tmp_path / "share")
    s.mounted = True  # as after the virtio-fs mount
    (tmp_path / "share" / "c1" / "1").mkdir(parents=True)
    (tmp_path / "share" / "c1" / "0").touch()
    return s


def test_shared_mounts_get_the_share_as_source(tmp_path: Path) -> None:
    doc = spec()
    share(tmp_path).apply("c1", doc, [pb.SharedMount(mount=1, volume=0), pb.SharedMount(mount=2, volume=1)])
    assert doc["mounts"][1]["source"] == str(tmp_path / "share" / "c1" / "0")
    assert doc["mounts"][1]["options"] == ["rbind", "ro"]
    assert doc["mounts"][2]["source"] == str(tmp_path / "share" / "c1" / "1")
    assert doc["mounts"][0]["source"] == "proc"


@pytest.mark.parametrize(
    ("shared", "problem"),
    [
        ([pb.SharedMount(mount=3, volume=0)], "no such mount"),
        ([pb.SharedMount(mount=0, volume=0)], "not a bind mount"),
        ([pb.SharedMount(mount=1, volume=0), pb.SharedMount(mount=1, volume=1)], "given twice"),
        ([pb.SharedMount(mount=1, volume=5)], "the host shared no volume c1/5"),
    ],
)
def test_shared_mounts_that_match_nothing_are_refused(
    tmp_path: Path, shared: list[pb.SharedMount], problem: str
) -> None:
    with pytest.raises(validate.InvalidRequest, match=problem):
        share(tmp_path).apply("c1", spec(), shared)


def test_a_deleted_containers_volume_mounts_are_detached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = share(tmp_path)
    root = tmp_path / "share"
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"1 0 0:1 / / rw - rootfs rootfs rw\n"
        f"2 1 0:2 / {root} rw - virtiofs spinbox rw\n"
        f"3 2 0:3 / {root}/c1/0 rw - virtiofs spinbox rw\n"
        f"4 2 0:4 / {root}/c10/0 rw - virtiofs spinbox rw\n"
    )
    detached: list[tuple[str, int]] = []
    monkeypatch.setattr(
        "guest.vminitd.syscalls.umount", lambda target, flags=0: detached.append((target, flags))
    )
    s.release("c1", mountinfo)
    assert detached == [(f"{root}/c1/0", 2)]
