"""crun, run by vminitd: one command at a time, its failure as crun's own message."""

from __future__ import annotations

import contextlib
import itertools

from guest.vminitd.config import RuntimeConfig
from guest.vminitd.reaper import Reaper, exit_code


class CrunError(Exception):
    pass


class Crun:
    def __init__(self, config: RuntimeConfig, reaper: Reaper) -> None:
        self.config = config
        self.reaper = reaper
        self.root = config.state_dir / "crun"
        self.counter = itertools.count()

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
            _, done = self.reaper.spawn(argv, *stdio)
            code = exit_code(await done)
            if code != 0:
                text = log_file.read_text(errors="replace").strip() if log_file.exists() else ""
                message = text.splitlines()[-1] if text else f"exit status {code}"
                raise CrunError(f"crun {args[0]} failed: {message}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                log_file.unlink()
