"""vsock context ids, allocated safely across processes.

A CID is held by an exclusive flock on /run/spinbox/cid/<cid>. The locked file
descriptor is handed to QEMU, so the lease lives exactly as long as the VM does,
whichever process started it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from spinbox.vm.errors import VmError

CID_DIR = Path("/run/spinbox/cid")
FIRST_CID = 3  # 0-2 are reserved (hypervisor, local, host)
LAST_CID = 0xFFFFFFFE


class CidLease:
    """An allocated CID and the locked file descriptor that holds it."""

    def __init__(self, cid: int, fd: int, path: Path) -> None:
        self.cid = cid
        self.fd = fd
        self.path = path

    def close(self) -> None:
        """Drop this process's hold (QEMU keeps its own copy of the descriptor)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def release(self) -> None:
        """Give the CID back while still holding it, so nobody locks a file being removed."""
        if self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.close()


def allocate_cid(directory: Path = CID_DIR, first: int = FIRST_CID, last: int = LAST_CID) -> CidLease:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for cid in range(first, last + 1):
        lease = _try_lock(directory / str(cid), cid)
        if lease is not None:
            return lease
    raise VmError(f"no free vsock CID between {first} and {last} (leases in {directory})")


def _try_lock(path: Path, cid: int) -> CidLease | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # The file may have been released (unlinked) between our open and flock.
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return _try_lock(path, cid)
    return CidLease(cid, fd, path)
