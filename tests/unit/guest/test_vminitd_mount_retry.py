"""A hot-plugged disk can answer ENXIO for a moment after it shows in sysfs:
the rootfs mount waits that out, and fails at once on any other error."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from guest.vminitd import rootfs, syscalls


def test_enxio_is_waited_out(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [OSError(errno.ENXIO, "No such device or address")] * 3
    calls: list[str] = []

    def mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
        calls.append(source)
        if answers:
            raise answers.pop()

    monkeypatch.setattr(syscalls, "mount", mount)
    rootfs.mount_when_ready(Path("/dev/vde"), Path("/mnt"), "erofs", 0, wait=5)
    assert calls == ["/dev/vde"] * 4


def test_other_errors_and_a_lasting_enxio_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    def bad_fs(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(syscalls, "mount", bad_fs)
    with pytest.raises(OSError) as info:
        rootfs.mount_when_ready(Path("/dev/vde"), Path("/mnt"), "erofs", 0, wait=5)
    assert info.value.errno == errno.EINVAL

    def gone(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
        raise OSError(errno.ENXIO, "No such device or address")

    monkeypatch.setattr(syscalls, "mount", gone)
    with pytest.raises(OSError) as info:
        rootfs.mount_when_ready(Path("/dev/vde"), Path("/mnt"), "erofs", 0, wait=0.1)
    assert info.value.errno == errno.ENXIO
