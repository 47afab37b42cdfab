"""vminitd runs crun from one sealed copy of its binary, made once: crun then does not copy
itself into a new memfd and execute again on every run (its CVE-2019-5736 protection)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from guest.vminitd.config import RuntimeConfig
from guest.vminitd.crun import CRUN_SEALS, Crun, CrunError, sealed_copy
from guest.vminitd.reaper import Reaper

CRUN = shutil.which("crun")


def test_the_copy_is_sealed_as_crun_s_own_and_holds_the_binary() -> None:
    fd = sealed_copy("/bin/true")
    assert fd is not None
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == CRUN_SEALS
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.pread(fd, 1 << 20, 0) == Path("/bin/true").read_bytes()
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
    finally:
        os.close(fd)


def test_a_script_or_a_missing_file_is_run_by_its_path(tmp_path: Path) -> None:
    script = tmp_path / "crun"
    script.write_text("#!/bin/sh\nexit 0\n")
    assert sealed_copy(str(script)) is None
    assert sealed_copy(str(tmp_path / "absent")) is None
    crun = Crun(RuntimeConfig(state_dir=tmp_path, rootfs_dir=tmp_path, crun=str(script)), Reaper())
    assert crun.executable == str(script)


def execs(tmp_path: Path, program: str, fds: tuple[int, ...] = ()) -> list[str]:
    """The execve/execveat calls of `program --version`, under strace."""
    trace = tmp_path / "trace"
    subprocess.run(
        ["strace", "-f", "-o", str(trace), "-e", "trace=execve,execveat", program, "--version"],
        capture_output=True, check=True, pass_fds=fds,
    )  # fmt: skip
    return [line for line in trace.read_text().splitlines() if "exec" in line and "+++" not in line]


@pytest.mark.skipif(CRUN is None or shutil.which("strace") is None, reason="needs crun and strace")
def test_crun_started_from_the_copy_does_not_copy_itself_again(tmp_path: Path) -> None:
    assert CRUN is not None
    # From its path, crun copies itself into a memfd and executes that.
    assert any("execveat(" in line for line in execs(tmp_path, CRUN))
    fd = sealed_copy(CRUN)
    assert fd is not None
    try:
        os.set_inheritable(fd, True)
        calls = execs(tmp_path, f"/proc/self/fd/{fd}", (fd,))
    finally:
        os.close(fd)
    assert len(calls) == 1 and "execveat(" not in calls[0], calls


@pytest.mark.skipif(CRUN is None, reason="needs crun")
def test_crun_runs_from_the_copy_and_its_failure_is_its_own(tmp_path: Path) -> None:
    assert CRUN is not None

    async def run() -> None:
        reaper = Reaper()
        reaper.start()
        crun = Crun(RuntimeConfig(state_dir=tmp_path, rootfs_dir=tmp_path, crun=CRUN), reaper)
        assert crun.executable.startswith("/proc/self/fd/")
        try:
            await crun.run("state", "absent")
        finally:
            reaper.stop()

    with pytest.raises(CrunError, match=r"crun state failed: .*absent"):
        asyncio.run(run())
