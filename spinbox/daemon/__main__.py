"""spinboxd's entry point: `python -m spinbox.daemon` or `spinboxd`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from spinbox.config import CONFIG_PATH, ConfigError, load
from spinbox.daemon.daemon import Daemon, StartupError
from spinbox.daemon.state import RUN_DIR

# sysexits.h EX_CONFIG: the unit does not restart on it.
EXIT_CONFIG = 78


def _setup_logging(level: str) -> None:
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="spinboxd")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("spinboxd: %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spinboxd", description="spinbox's VM service")
    parser.add_argument("--config", type=Path, default=CONFIG_PATH, help="configuration file")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="runtime state directory")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    args = parser.parse_args(argv)

    try:
        config = load(args.config)
    except ConfigError as e:
        print(f"spinboxd: bad configuration: {e}", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(config.daemon.log_level)

    from spinbox.daemon.qemu import QemuBackend

    backend = QemuBackend(config)
    try:
        backend.check_config()
    except ConfigError as e:
        print(f"spinboxd: bad configuration: {args.config}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        return 0
    daemon = Daemon(config, backend, run_dir=args.run_dir)
    try:
        asyncio.run(daemon.run())
    except StartupError as e:
        logging.getLogger("spinboxd").error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
