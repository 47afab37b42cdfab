"""crun, run by vminitd: one command at a time, its failure as crun's own message."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os

from guest.vminitd.config import RuntimeConfig
from guest.vminitd.reaper import Reaper, exit_code

log = logging.getLogger(__name__)

# crun protects its binary from a container (CVE-2019-5736) by running from a copy of it in a
# memfd sealed with these: started from elsewhere, every crun run copies itself into a new one
# and executes again. vminitd makes the copy once (a template's guest before it is saved), so
# each run starts once, and under TCG the code translated for the last run is found again.
CRUN_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class CrunError(Exception):
    pass


def sealed_copy(path: str) -> int | None:
    """A memfd holding the program at `path`, sealed as crun's own copy is; None if it cannot be
    made, or `path` is not an ELF executable (a script could not be run from a descriptor)."""
    try:
        with open(path, "rb") as binary:
            data = binary.read()
    except OSError as e:
        log.warning("crun copies itself on every run: cannot read %s: %s", path, e.strerror)
        return None
    if not data.startswith(b"\x7fELF"):
        return None
    try:
        fd = os.memfd_create("crun", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as e:
        log.warning("crun copies itself on every run: no memfd for it: %s", e.strerror)
        return None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, CRUN_SEALS)
    except OSError as e:
        os.close(fd)
        log.warning("crun copies itself on every run: cannot copy %s: %s", path, e.strerror)
        return None
    return fd


class Crun:
    def __init__(self, config: RuntimeConfig, reaper: Reaper) -> None:
        self.config = config
        self.reaper = reaper
        self.root = config.state_dir / "crun"
        self.counter = itertools.count()
        self.binary = sealed_copy(config.crun)

    @property
    def executable(self) -> str:
        """What is executed: the sealed copy (found by each child in its own descriptors), or crun."""
        return self.config.crun if self.binary is None else f"/proc/self/fd/{self.binary}"

    async def run(
        self,
        *args: str,
        stdio: tuple[int | None, int | None, int | None] = (None, None, None),
    ) -> None:
        """Runs one crun command; a failure raises CrunError with crun's own message."""
        log_file = self.config.state_dir / "logs" / f"crun-{next(self.counter)}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            self.config.crun,
            "--root", str(self.root),
            "--log", f"file:{log_file}",
            *self.config.crun_args,
            *args,
        ]  # fmt: skip
        try:
            _, done = self.reaper.spawn(argv, *stdio, executable=self.executable)
            code = exit_code(await done)
            if code != 0:
                text = log_file.read_text(errors="replace").strip() if log_file.exists() else ""
                message = text.splitlines()[-1] if text else f"exit status {code}"
                raise CrunError(f"crun {args[0]} failed: {message}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                log_file.unlink()
