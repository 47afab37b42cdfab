"""What a crash left on disk is gone once spinboxd comes back: per-VM storage, unused layer images."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.harness.systemd import PrivateSystemd
from tests.integration.daemon.spinboxd import PYTHON, TOP, installed

LAYERS = "/var/lib/spinbox/layers"
KEY = "0" * 64


@pytest.fixture
def spinbox(systemd: PrivateSystemd) -> Iterator[PrivateSystemd]:
    with installed(systemd):
        yield systemd


def test_storage_a_crash_left_is_unmounted_removed_and_collected(spinbox: PrivateSystemd) -> None:
    # A previous spinboxd died while VM vm-gone was being created: its state,
    # its storage directory with a read-only mount still in it, an unreferenced
    # layer image and a half-built one.
    storage = "/var/lib/spinbox/vms/vm-gone"
    state = {
        "id": "vm-gone",
        "phase": "creating",
        "scope": "spinbox-vm-vm-gone.scope",
        "storage_dir": storage,
    }
    spinbox.write_file("/run/spinbox/vm/vm-gone/state.json", json.dumps(state))
    spinbox.write_file("/var/lib/spinbox/layer-source/keep", "the source's data\n")
    spinbox.path(f"{storage}/mnt").mkdir(parents=True)
    spinbox.run("mount", "--bind", "-o", "ro", "/var/lib/spinbox/layer-source", f"{storage}/mnt")
    spinbox.write_file(f"{LAYERS}/images/{KEY}.erofs", b"\0" * 4096)
    spinbox.write_file(f"{LAYERS}/tmp/{KEY}.0123abcd.erofs", b"\0" * 4096)
    try:
        spinbox.systemctl("start", "spinbox.service")
        # spinboxd serves first, then cleans up what its predecessor left, then the layer cache.
        spinbox.wait_for(
            "the crash's leftovers cleaned up",
            lambda: (
                not spinbox.path(storage).exists()
                and not spinbox.path(f"{LAYERS}/tmp/{KEY}.0123abcd.erofs").exists()
            ),
        )

        assert f" {storage}/" not in spinbox.run("cat", "/proc/self/mounts").stdout
        assert not spinbox.path("/run/spinbox/vm/vm-gone").exists()
        assert spinbox.path("/var/lib/spinbox/layer-source/keep").read_text() == "the source's data\n"
        # Images other tests' VMs left are still referenced by their layers and stay.
        assert not spinbox.path(f"{LAYERS}/images/{KEY}.erofs").exists()
        assert not spinbox.path(f"{LAYERS}/tmp/{KEY}.0123abcd.erofs").exists()
    finally:
        spinbox.run("umount", f"{storage}/mnt", check=False)
        spinbox.run(
            "rm",
            "-rf",
            storage,
            "/var/lib/spinbox/layer-source",
            f"{LAYERS}/images/{KEY}.erofs",
            f"{LAYERS}/tmp/{KEY}.0123abcd.erofs",
        )


def test_storage_with_no_vm_state_is_kept_and_named(spinbox: PrivateSystemd) -> None:
    # The host rebooted (/run is empty) with a VM's storage on disk: its
    # writable layer may hold changes never written back.
    storage = "/var/lib/spinbox/vms/vm-rebooted"
    spinbox.write_file(f"{storage}/rootfs-c1/upper.img", "the user's data\n")
    try:
        spinbox.systemctl("start", "spinbox.service")

        assert spinbox.path(f"{storage}/rootfs-c1/upper.img").read_text() == "the user's data\n"
        journal = spinbox.journal("-u", "spinbox.service", "-o", "cat")
        assert f"{storage}: storage of VM vm-rebooted with no VM state in /run" in journal, journal[-2000:]
        check = spinbox.run(
            "env", f"PYTHONPATH={TOP}", str(PYTHON), "-m", "spinbox.cli", "check", check=False
        ).stdout
        assert "leftover" in check and storage in check, check
    finally:
        spinbox.systemctl("stop", "spinbox.service", check=False)
        spinbox.run("rm", "-rf", storage)
