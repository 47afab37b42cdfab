"""A template's RAM as restored VMs map it: a copy in a memfd that nothing can change."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest

from spinbox.vm import VmError
from spinbox.vm.template import TemplateFiles, load_ram

PAGE = 4096
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


@pytest.fixture
def files(tmp_path: Path) -> TemplateFiles:
    """A 64-page RAM file: data in pages 0 and 9 to 11, zeros written in page 5, holes elsewhere."""
    files = TemplateFiles(tmp_path)
    with open(files.ram, "wb") as ram:
        ram.truncate(64 * PAGE)
        ram.write(b"boot" * (PAGE // 4))
        ram.seek(5 * PAGE)
        ram.write(bytes(PAGE))
        ram.seek(9 * PAGE)
        ram.write(os.urandom(3 * PAGE))
    return files


def test_the_copy_is_the_file_s_content_with_its_data_pages_only(files: TemplateFiles) -> None:
    ram = load_ram(files)
    try:
        assert os.fstat(ram).st_size == 64 * PAGE
        assert os.pread(ram, 64 * PAGE, 0) == files.ram.read_bytes()
        # Holes and pages of zeros take no memory: 4 pages of data are held.
        assert allocated(ram) == 4 * PAGE
    finally:
        os.close(ram)


def test_nothing_can_write_punch_resize_or_unseal_it(files: TemplateFiles) -> None:
    ram = load_ram(files)
    try:
        before = os.pread(ram, 64 * PAGE, 0)
        refused = [
            lambda: os.pwrite(ram, b"x", 0),
            lambda: os.ftruncate(ram, PAGE),
            lambda: os.ftruncate(ram, 128 * PAGE),
            lambda: os.posix_fallocate(ram, 0, 128 * PAGE),
            lambda: mmap.mmap(ram, 64 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE),
        ]
        for attempt in refused:
            with pytest.raises(OSError) as raised:
                attempt()
            assert raised.value.errno == errno.EPERM
        # A reopened descriptor (what QEMU gets from /proc/self/fd/N) is refused the same.
        reopened = os.open(f"/proc/self/fd/{ram}", os.O_RDWR)
        try:
            with pytest.raises(OSError, match="Operation not permitted"):
                os.pwrite(reopened, b"x", 0)
            with pytest.raises(OSError, match="Operation not permitted"):
                _punch(reopened, 9 * PAGE, PAGE)
        finally:
            os.close(reopened)
        assert os.pread(ram, 64 * PAGE, 0) == before
    finally:
        os.close(ram)


def test_a_private_mapping_writes_its_own_copy(files: TemplateFiles) -> None:
    ram = load_ram(files)
    try:
        with mmap.mmap(ram, 64 * PAGE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) as guest:
            guest[0:4] = b"mine"
            assert guest[0:4] == b"mine"
        assert os.pread(ram, 4, 0) == b"boot"
    finally:
        os.close(ram)


@pytest.mark.parametrize("size", [0, PAGE + 1])
def test_a_ram_file_of_no_whole_pages_is_refused(tmp_path: Path, size: int) -> None:
    files = TemplateFiles(tmp_path)
    files.ram.write_bytes(b"x" * size)
    with pytest.raises(VmError, match="not whole pages"):
        load_ram(files)


def test_a_missing_ram_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(VmError, match=f"cannot read the template's RAM {tmp_path}/ram"):
        load_ram(TemplateFiles(tmp_path))


def _punch(fd: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
