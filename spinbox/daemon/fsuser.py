"""Whom a VM's virtiofsd runs as, and where: a uid of its own, in namespaces of its own.

virtiofsd creates the guest's files with the guest's owners, so it needs the
file capabilities (CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID). It
gets them only in a user namespace that spinboxd makes for it and that holds
nothing else, never in the host's:

- virtiofsd runs as a uid leased like a QEMU's (`vm.uid_base` + n, an flock
  that virtiofsd inherits), never as root and never as any QEMU's uid. That
  uid creates the namespace, so it owns it: no other process has the owner's
  power over it.
- spinboxd (root, CAP_SETUID and CAP_SETGID in the host's namespace) writes
  the namespace's uid and gid maps: the identity, so that owners are the
  same on both sides (a file the guest creates as uid 1000 is uid 1000's on
  the host; root's files stay root's).
- It keeps only the file capabilities there (SYS_CHROOT and SETPCAP too
  until it has set itself up; it drops them itself). MKNOD and SETFCAP are
  not given (`modcaps`): the kernel checks CAP_MKNOD in the host's namespace
  anyway, so no device node can be made through a share; a file capability
  written from a namespace that maps the host's root would be the host's
  (extended attributes are off in any case).
- The securebits keep its capabilities across its per-request changes of
  effective uid (SECBIT_NO_SETUID_FIXUP): virtiofsd was written to run as
  uid 0, where the kernel restores them, and as uid n a request of the
  guest's root would otherwise take them away for good.
- Its sandbox is made here, not by virtiofsd (`-o sandbox=chroot`): new
  mount, PID, network and IPC namespaces whose root is a read-only tmpfs
  holding the share, /usr read-only, and a read-only proc. The namespace maps
  the host's uid 0, so virtiofsd can take that uid, and the host's root uid
  may write the host's sysctls and /proc/sysrq-trigger with no capability
  at all: virtiofsd's own sandbox (`sandbox=namespace`) mounts a fresh,
  writable proc it keeps a descriptor into. Here every proc it can reach is
  read-only, and it cannot remount it (it holds no SYS_ADMIN).
- This is QEMU's C virtiofsd (Debian 12's /usr/lib/qemu/virtiofsd), which
  was checked to work so. The separate virtiofsd package, with other
  options and its own handling of user namespaces, was not: it still runs
  as root in its own sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
from pathlib import Path

from spinbox.daemon.errors import Failed
from spinbox.vm.handover import VmUser, allocate_vm_user

# The capabilities virtiofsd keeps, in its namespace; it asks for MKNOD and SETFCAP unless told.
FILE_CAPS = ("chown", "dac_override", "fowner", "fsetid", "setgid", "setuid")
MODCAPS = "modcaps=-mknod:-setfcap"
# Held until virtiofsd has set itself up (chroot into the share, its bounding set); it drops them.
SETUP_CAPS = ("sys_chroot", "setpcap")
SECUREBITS = "+no_setuid_fixup,+no_setuid_fixup_locked,+noroot,+noroot_locked,+keep_caps_locked"
# Every uid and gid is itself inside.
IDENTITY_MAP = "0 0 4294967295\n"
# virtiofsd raises its descriptor limit to this much unless told (it keeps one per inode the guest knows).
NOFILE = 1_000_000
# The virtiofsd that runs confined so (QEMU's own, in C).
CONFINABLE = Path("/usr/lib/qemu/virtiofsd")
# Where the share is in virtiofsd's root.
SHARE = "/share"
SETPRIV = "setpriv"
UNSHARE = "unshare"
POLL_INTERVAL = 0.01
# virtiofsd's root, built in its new mount namespace as that namespace's uid 0 (mount(8) mounts
# for no other uid) from $1 (an empty directory) and $2 (the share), then "$@" is run in it:
# a read-only tmpfs with the share, /usr (and the root's links into it, or its lib directories)
# read-only, and a read-only proc. A bind of the share receives the binds added to it later.
SETUP = r"""
set -e
root=$1 share=$2
shift 2
mount -t tmpfs -o mode=0755,nosuid,nodev,size=64k spinbox-virtiofsd "$root"
cd "$root"
mkdir share proc usr oldroot
mount --rbind "$share" share
for d in bin sbin lib lib32 lib64 libx32; do
  if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$d"
  elif [ -d "/$d" ]; then mkdir "$d" && mount --rbind "/$d" "$d" && mount -o remount,bind,ro "$d"
  fi
done
mount --rbind /usr usr
mount -o remount,bind,ro usr
mount -t proc -o ro,nosuid,nodev,noexec proc proc
pivot_root . oldroot
umount -l /oldroot
rmdir /oldroot
mount -o remount,bind,ro /
exec "$@"
"""


def _caps(names: tuple[str, ...]) -> str:
    return ",".join(["-all", *(f"+{name}" for name in names)])


def nofile_limit() -> int:
    """virtiofsd's descriptor limit: as high as spinboxd's hard limit allows, up to NOFILE (raising the
    hard limit takes CAP_SYS_RESOURCE in the host's namespace, which virtiofsd has not)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return NOFILE if hard == resource.RLIM_INFINITY else min(hard, NOFILE)


class FsUser:
    """One VM's virtiofsd identity; `lease_fd` holds the uid while virtiofsd runs."""

    def __init__(self, user: VmUser) -> None:
        self.uid = user.uid
        self.gid = user.gid
        self.lease_fd = user.lease_fd

    @classmethod
    def allocate(cls, base: int) -> FsUser:
        return cls(allocate_vm_user(kvm=False, base=base))

    def prefix(self) -> list[str]:
        """argv that runs the rest as this uid in a new user namespace, with no capability in the
        host's namespace. SYS_ADMIN only until the namespace exists: it lets the uid make it where
        unprivileged user namespaces are off (Debian's kernel.unprivileged_userns_clone=0);
        `--keep-caps` keeps the new namespace's capabilities for the next stage."""
        return [
            SETPRIV,
            "--reuid", str(self.uid),
            "--regid", str(self.gid),
            "--clear-groups",
            "--inh-caps", _caps(("sys_admin",)),
            "--ambient-caps", _caps(("sys_admin",)),
            "--bounding-set", _caps(("sys_admin",)),
            "--",
            UNSHARE, "--user", "--keep-caps", "--",
        ]  # fmt: skip

    def wrap(self, argv: list[str], root: Path, share: Path) -> list[str]:
        """What runs inside the user namespace once its maps are written: new mount, PID, network
        and IPC namespaces with `root` (an empty directory) made virtiofsd's root around `share`,
        and virtiofsd (its `argv`, serving SHARE with `-o sandbox=chroot`) as this uid with only
        the capabilities it needs there. Only the forked child is in the new PID namespace: it is
        started once the process is in the VM's scope."""
        caps = _caps((*FILE_CAPS, *SETUP_CAPS))
        return [
            UNSHARE, "--mount", "--pid", "--net", "--ipc", "--fork", "--kill-child",
            "--propagation", "slave", "--",
            SETPRIV, "--reuid", "0", "--regid", "0", "--clear-groups", "--",
            "/bin/sh", "-c", SETUP, "virtiofsd-setup", str(root), str(share),
            SETPRIV,
            "--reuid", str(self.uid),
            "--regid", str(self.gid),
            "--clear-groups",
            "--inh-caps", caps,
            "--ambient-caps", caps,
            "--bounding-set", caps,
            "--securebits", SECUREBITS,
            "--",
            *argv,
            "-o", MODCAPS,
            f"--rlimit-nofile={nofile_limit()}",
        ]  # fmt: skip

    async def map_ids(self, process: subprocess.Popen[bytes], timeout: float) -> None:  # noqa: ASYNC109
        """Once `process` is in its new user namespace, write the identity maps (spinboxd's part)."""
        await _wait_for_namespace(process, timeout)
        try:
            for name in ("uid_map", "gid_map"):
                _write(Path(f"/proc/{process.pid}/{name}"), IDENTITY_MAP)
        except OSError as e:
            raise Failed(
                f"cannot map the ids of the VM's virtiofsd (pid {process.pid}) in its user namespace: "
                f"{e.strerror}"
            ) from None


def _write(path: Path, text: str) -> None:
    """One write(2) of the whole map, as the kernel requires (a /proc file: never blocks)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _user_namespace(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/user").st_ino


async def _wait_for_namespace(process: subprocess.Popen[bytes], timeout: float) -> None:  # noqa: ASYNC109
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    host = _user_namespace("self")
    while True:
        status = process.poll()
        if status is not None:
            raise Failed(
                f"the VM's virtiofsd ended (status {status}) before it had a user namespace of its own; "
                "its messages are in the VM's journal"
            )
        with contextlib.suppress(FileNotFoundError):
            if _user_namespace(process.pid) != host:
                return
        if loop.time() > deadline:
            raise Failed(
                f"the VM's virtiofsd had no user namespace of its own within {timeout:g} s "
                "(timeouts.virtiofsd_start)"
            )
        await asyncio.sleep(POLL_INTERVAL)
