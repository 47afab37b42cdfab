"""A VM's uid lease and the descriptors spinboxd hands to QEMU."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from spinbox.vm import VmError
from spinbox.vm.handover import Handover, allocate_vm_user


def test_each_running_vm_gets_a_uid_of_its_own(tmp_path: Path) -> None:
    first = allocate_vm_user(kvm=False, base=5000, count=3, directory=tmp_path)
    second = allocate_vm_user(kvm=False, base=5000, count=3, directory=tmp_path)
    assert (first.uid, first.gid, second.uid, second.gid) == (5000, 5000, 5001, 5001)
    assert first.groups == ()
    # QEMU inherits the lease: the uid stays taken after spinboxd lets go, until QEMU exits.
    child = subprocess.Popen(["sleep", "30"], pass_fds=(first.lease_fd,))
    try:
        first.close()
        assert allocate_vm_user(kvm=False, base=5000, count=3, directory=tmp_path).uid == 5002
        with pytest.raises(VmError, match="no free VM uid between 5000 and 5002"):
            allocate_vm_user(kvm=False, base=5000, count=3, directory=tmp_path)
    finally:
        child.kill()
        child.wait()
    second.close()
    assert allocate_vm_user(kvm=False, base=5000, count=3, directory=tmp_path).uid == 5000


def test_uid_ranges_outside_the_usable_ones_are_refused(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="must lie within 1000-2147483647"):
        allocate_vm_user(kvm=False, base=0, directory=tmp_path)


def test_handover_closes_what_it_opened(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    with Handover() as files:
        args, name = files.fdset(image, writable=True)
        sock = files.listening_socket(tmp_path / "s.sock")
        opened = list(files.fds)
        assert name == "/dev/fdset/1" and args == ["-add-fd", f"fd={opened[0]},set=1"]
        assert all(not os.get_inheritable(fd) for fd in opened)  # only the spawn's pass_fds inherit them
        assert sock in opened
    for fd in opened:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with Handover() as files, pytest.raises(VmError, match=f"cannot open {tmp_path}/gone.img for the VM"):
        files.file(tmp_path / "gone.img", writable=False)
