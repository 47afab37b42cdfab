"""What spinboxd opens for a QEMU and hands over, and whom that QEMU runs as.

A VM's QEMU runs as a user of its own (`VmUser`: one uid and gid per running
VM, no supplementary group but `kvm` where KVM is used, no capabilities,
no_new_privs) under QEMU's `-sandbox` (seccomp), in network and IPC
namespaces of its own that hold nothing: it needs no network but its TAP
descriptors, and so reaches no host service on 127.0.0.1 and no abstract unix
socket. It opens nothing of the host
by path except world-readable files of the system (QEMU's firmware and
modules). Everything that belongs to a VM is opened by spinboxd, as root, and
handed to QEMU as a file descriptor (`Handover`):

- listening unix sockets (QMP, console, agent, control, log; later a
  virtiofsd's): bound by spinboxd in the root-only runtime directory, passed
  as `-chardev socket,fd=N,server=on`; QEMU listens on the descriptor and
  never sees the path;
- disk images: `-add-fd fd=N,set=S` and a blockdev on `/dev/fdset/S`; disks
  hot-plugged later go over QMP (SCM_RIGHTS, then `add-fd`), see
  VirtualMachine.add_disk;
- TAP devices: `-netdev tap,fd=N` (spinbox.net opens them);
- /dev/vhost-vsock: `vhostfd=N`;
- kernel and initrd: `/proc/self/fd/N`. QEMU opens these by path through the
  descriptor, which skips the directories' permissions but not the file's:
  they must be world-readable (they hold nothing secret).

Anything added to a VM later follows the same rule: spinboxd opens, QEMU (or
virtiofsd, which runs as a uid of its own from the same range: see
spinbox.daemon.fsuser) receives a descriptor. A path QEMU opens itself is a
regression.

Why a uid per VM rather than one shared system user: processes of one uid
may open each other's descriptors through /proc/PID/fd, signal and ptrace
each other. With one shared user, a guest that took over its QEMU could read
every other VM's disks through the other QEMUs' descriptors.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from spinbox.vm.cid import _try_lock
from spinbox.vm.errors import VmError

# The uids (and equal gids) of running VMs: UID_BASE + slot, one slot per VM.
# 0x7D000000 lies in the range systemd leaves unused (above the container
# ranges systemd-nspawn picks from, below 2^31); config key vm.uid_base.
UID_BASE = 0x7D000000
UID_COUNT = 65536
UID_DIR = Path("/run/spinbox/uid")
# QEMU's seccomp sandbox: no obsolete syscalls, no set*uid/capabilities, no
# fork/exec, no scheduler or affinity changes.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
SETPRIV = "setpriv"
UNSHARE = "unshare"


@dataclass(frozen=True)
class VmUser:
    """The identity of one VM's processes; `lease_fd` holds the uid while the VM runs."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    lease_fd: int = -1

    def setpriv(self, argv: list[str]) -> list[str]:
        """argv run as this user: no other groups, no capabilities, no_new_privs, empty network and IPC."""
        groups = ["--groups", ",".join(map(str, self.groups))] if self.groups else ["--clear-groups"]
        return [
            UNSHARE, "--net", "--ipc", "--",
            SETPRIV,
            "--reuid", str(self.uid),
            "--regid", str(self.gid),
            *groups,
            "--inh-caps", "-all",
            "--bounding-set", "-all",
            "--no-new-privs",
            "--",
            *argv,
        ]  # fmt: skip

    def close(self) -> None:
        """Drop spinboxd's hold on the uid (QEMU keeps its copy of the lease)."""
        if self.lease_fd >= 0:
            os.close(self.lease_fd)
            object.__setattr__(self, "lease_fd", -1)


def allocate_vm_user(
    *, kvm: bool, base: int = UID_BASE, count: int = UID_COUNT, directory: Path = UID_DIR
) -> VmUser:
    """A uid no running VM holds, leased by an flock its QEMU inherits (like the vsock CID)."""
    if base < 1000 or base + count > 2**31:
        raise VmError(f"the VMs' uid range {base}-{base + count - 1} must lie within 1000-2147483647")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    groups: tuple[int, ...] = ()
    if kvm:
        # /dev/kvm without a kvm group: QEMU's open of it fails and says so.
        with contextlib.suppress(KeyError):
            groups = (grp.getgrnam("kvm").gr_gid,)
    for slot in range(count):
        lease = _try_lock(directory / str(slot), slot)
        if lease is not None:
            return VmUser(base + slot, base + slot, groups, lease.fd)
    raise VmError(f"no free VM uid between {base} and {base + count - 1} (leases in {directory})")


class Handover:
    """Descriptors spinboxd opened for one QEMU: inherited by it, closed here after the spawn."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._fdsets = 0

    def __enter__(self) -> Handover:
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.close()

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def listening_socket(self, path: Path) -> int:
        """A unix socket bound at path (mode 0600, root's) and listening."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            path.unlink(missing_ok=True)
            # chmod after bind, not umask (process-wide, other threads create files): the
            # runtime directory is root's alone meanwhile.
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(8)
            sock.set_inheritable(False)
        except OSError as error:
            sock.close()
            raise VmError(f"cannot listen on {path}: {error.strerror}") from None
        return self._keep(sock.detach())

    def file(self, path: Path, *, writable: bool) -> int:
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            return self._keep(os.open(path, flags))
        except OSError as error:
            raise VmError(f"cannot open {path} for the VM: {error.strerror}") from None

    def fdset(self, path: Path, *, writable: bool, set_id: int | None = None) -> tuple[list[str], str]:
        """QEMU options that put path's descriptor into a new fd set (`set_id`, or the next one
        counting from 1), and the set's file name."""
        fd = self.file(path, writable=writable)
        if set_id is None:
            self._fdsets += 1
            set_id = self._fdsets
        return ["-add-fd", f"fd={fd},set={set_id}"], f"/dev/fdset/{set_id}"

    def world_readable(self, path: Path, what: str) -> str:
        """A /proc/self/fd path to a public file QEMU reads itself (kernel, initrd)."""
        fd = self.file(path, writable=False)
        if not os.fstat(fd).st_mode & stat.S_IROTH:
            raise VmError(
                f"{what} {path} is not readable by the VMs' users: make it world-readable "
                f"(chmod o+r {path}); QEMU runs unprivileged"
            )
        return f"/proc/self/fd/{fd}"


class NumberingHandover(Handover):
    """A Handover that opens nothing: each descriptor is the next number from `first`.

    For a command line that is compared, not run (a template's identity): the
    same spec gives the same argv wherever and whenever it is built.
    """

    def __init__(self, first: int = 1000) -> None:
        super().__init__()
        self._next = first

    def _number(self) -> int:
        self._next += 1
        return self._next - 1

    def listening_socket(self, path: Path) -> int:
        return self._number()

    def file(self, path: Path, *, writable: bool) -> int:
        return self._number()

    def world_readable(self, path: Path, what: str) -> str:
        return f"/proc/self/fd/{self._number()}"
