"""A pod's shared memory: the host directory the CRI binds at /dev/shm in every
container of a pod becomes the VM's own /dev/shm, which they all share."""

from __future__ import annotations

from pathlib import Path

from spinbox.shim.guestspec import for_guest


def test_the_pods_dev_shm_directory_becomes_the_vms(tmp_path: Path) -> None:
    shm = tmp_path / "sandboxes" / "pod" / "shm"
    shm.mkdir(parents=True)
    mount = {"destination": "/dev/shm", "type": "bind", "source": str(shm), "options": ["rbind", "rw"]}
    other = {"destination": "/data", "type": "bind", "source": str(tmp_path), "options": ["rbind"]}
    guest, files = for_guest({"ociVersion": "1.0.2", "mounts": [mount, other]})
    assert guest["mounts"] == [{**mount, "source": "/dev/shm"}]
    assert files == []


def test_a_file_bound_at_dev_shm_travels_as_a_file(tmp_path: Path) -> None:
    source = tmp_path / "shm-file"
    source.write_text("x")
    mount = {"destination": "/dev/shm", "type": "bind", "source": str(source), "options": ["rbind"]}
    guest, files = for_guest({"ociVersion": "1.0.2", "mounts": [mount]})
    assert guest["mounts"] == [mount]
    assert [f.content for f in files] == [b"x"]
