"""A pod's shared memory: the host directory the CRI binds at /dev/shm in every
container of a pod becomes the VM's own /dev/shm, which they all share; it is
no volume of the VM's share."""

from __future__ import annotations

from pathlib import Path

from spinbox.shim.guestspec import for_guest
from spinbox.shim.volumes import Volume, volumes_of


def test_the_pods_dev_shm_directory_becomes_the_vms(tmp_path: Path) -> None:
    shm = tmp_path / "sandboxes" / "pod" / "shm"
    shm.mkdir(parents=True)
    mount = {"destination": "/dev/shm", "type": "bind", "source": str(shm), "options": ["rbind", "rw"]}
    other = {"destination": "/data", "type": "bind", "source": str(tmp_path), "options": ["rbind"]}
    spec = {"ociVersion": "1.0.2", "mounts": [mount, other]}
    guest = for_guest(spec)
    assert guest["mounts"] == [{**mount, "source": "/dev/shm"}, other]
    volumes = volumes_of(spec, "c1")
    assert volumes.volumes == (Volume(str(tmp_path), read_only=False, recursive=False),)
    assert [(s.mount, s.volume) for s in volumes.shared] == [(1, 0)]


def test_a_file_bound_at_dev_shm_is_a_volume(tmp_path: Path) -> None:
    source = tmp_path / "shm-file"
    source.write_text("x")
    mount = {"destination": "/dev/shm", "type": "bind", "source": str(source), "options": ["rbind"]}
    spec = {"ociVersion": "1.0.2", "mounts": [mount]}
    assert for_guest(spec)["mounts"] == [mount]
    assert volumes_of(spec, "c1").volumes == (Volume(str(source), read_only=False, recursive=False),)
