"""Fixtures of the VM unit tests."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spinbox.vm.template import RAM_SEALS, new_ram


@dataclass(frozen=True)
class BootFiles:
    """A stand-in kernel and initrd, and a VM's runtime directory."""

    kernel: Path
    initrd: Path
    runtime_dir: Path


@pytest.fixture
def boot_files(tmp_path: Path) -> BootFiles:
    files = BootFiles(tmp_path / "vmlinuz", tmp_path / "initrd.img", tmp_path / "run")
    files.kernel.write_bytes(b"k")
    files.initrd.write_bytes(b"i")
    files.runtime_dir.mkdir()
    return files


@pytest.fixture
def sealed_ram() -> Iterator[int]:
    """A template's RAM as restored VMs get it: a 1 MiB memfd with its seals."""
    fd = new_ram("test-template", 1 << 20)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, RAM_SEALS)
    yield fd
    os.close(fd)
