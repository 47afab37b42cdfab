"""The few Linux system calls the stdlib does not wrap, through ctypes."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2

RB_POWER_OFF = 0x4321FEDC
SYSLOG_ACTION_READ_ALL = 3
PR_SET_CHILD_SUBREAPER = 36
SYS_FINIT_MODULE = 313  # x86_64
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
TIOCSWINSZ = 0x5414
ADDR_NO_RANDOMIZE = 0x0040000
_PERSONALITY_QUERY = 0xFFFFFFFF


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    _check(
        _libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags), data.encode()),
        f"mount {fstype} {source} on {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"unmount {target}")


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(fd), "syncfs")


def power_off() -> None:
    os.sync()
    _check(_libc.reboot(RB_POWER_OFF), "reboot(RB_POWER_OFF)")


def set_child_subreaper() -> None:
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def read_kernel_log(size: int = 1 << 16) -> str:
    """The last `size` bytes of the kernel log, without consuming them (syslog(2) READ_ALL)."""
    buffer = ctypes.create_string_buffer(size)
    length = _check(_libc.klogctl(SYSLOG_ACTION_READ_ALL, buffer, size), "syslog(READ_ALL)")
    return buffer.raw[:length].decode(errors="replace")


def finit_module(path: str) -> bool:
    """Loads a kernel module; False when it is already loaded (or built in)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.syscall(SYS_FINIT_MODULE, fd, b"", 0), f"finit_module {path}")
    except OSError as e:
        if e.errno == errno.EEXIST:
            return False
        raise
    finally:
        os.close(fd)
    return True


def freeze_thaw(fd: int) -> None:
    """Freezes then thaws a filesystem: everything is on disk and the journal is clean."""
    fcntl.ioctl(fd, FIFREEZE, 0)
    fcntl.ioctl(fd, FITHAW, 0)


def add_entropy(data: bytes) -> None:
    """Credits `data` to the kernel's entropy pool (RNDADDENTROPY on /dev/urandom)."""
    info = struct.pack("ii", len(data) * 8, len(data)) + data
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
    finally:
        os.close(fd)


def reseed_crng() -> None:
    """Has the kernel reseed its CRNG from the pool now (RNDRESEEDCRNG), not at its next interval."""
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDRESEEDCRNG, 0)
    finally:
        os.close(fd)


def set_window_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def add_personality(flags: int) -> int:
    """Adds `flags` to this process's personality (inherited by the programs it runs); returns it."""
    current = _check(_libc.personality(ctypes.c_ulong(_PERSONALITY_QUERY)), "personality")
    _check(_libc.personality(ctypes.c_ulong(current | flags)), "personality")
    return current | flags
