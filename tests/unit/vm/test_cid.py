"""vsock CIDs: one per VM across processes, held for as long as the QEMU holding the lock lives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from spinbox.vm.cid import allocate_cid

HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
sys.stdin.read()
"""


def test_allocations_differ(tmp_path: Path) -> None:
    first = allocate_cid(tmp_path)
    second = allocate_cid(tmp_path)
    assert first.cid == 3
    assert second.cid == 4
    first.release()
    third = allocate_cid(tmp_path)
    assert third.cid == 3
    second.release()
    third.release()
    assert list(tmp_path.iterdir()) == []


def test_a_cid_held_by_another_process_is_skipped(tmp_path: Path) -> None:
    lease = allocate_cid(tmp_path)
    path = lease.path
    lease.close()  # as launch() does once QEMU holds the descriptor
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        other = allocate_cid(tmp_path)
        assert other.cid == 4
        other.release()
    finally:
        holder.communicate("")
    again = allocate_cid(tmp_path)
    assert again.cid == 3  # free once its holder is gone
    again.release()


def test_the_lease_survives_in_an_inheriting_child(tmp_path: Path) -> None:
    lease = allocate_cid(tmp_path)
    child = subprocess.Popen(["sleep", "30"], pass_fds=(lease.fd,))
    try:
        lease.close()
        assert allocate_cid(tmp_path).cid == 4
    finally:
        child.kill()
        child.wait()
    assert allocate_cid(tmp_path).cid == 3
