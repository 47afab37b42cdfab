"""spinboxd: the service itself, from bus connection to READY=1 and back down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from dbus_fast import BusType
from dbus_fast.constants import NameFlag, RequestNameReply
from systemd import daemon as sd_daemon

from spinbox.busnames import BUS_NAME
from spinbox.config import Config
from spinbox.daemon.auth import SpecHidingBus
from spinbox.daemon.backend import Backend
from spinbox.daemon.manager import VmManager
from spinbox.daemon.scopememory import say_if_not_enforced
from spinbox.daemon.service import PRIVATE, export_manager
from spinbox.daemon.state import RUN_DIR
from spinbox.daemon.systemd import SystemdManager

log = logging.getLogger("spinboxd")


class StartupError(RuntimeError):
    pass


def _status(count: int) -> str:
    return f"{count} VM{'s' if count != 1 else ''} running"


class Daemon:
    def __init__(
        self, config: Config, backend: Backend, run_dir: Path = RUN_DIR, bus_address: str | None = None
    ):
        self.config = config
        self.backend = backend
        self.run_dir = run_dir
        self.bus_address = bus_address
        self._stop = asyncio.Event()

    def _notify(self, text: str) -> None:
        sd_daemon.notify(text)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signo in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signo, self._stop.set)

        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        if self.bus_address:
            bus = SpecHidingBus(bus_address=self.bus_address, bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        else:
            # OpenPortForward answers with a file descriptor.
            bus = SpecHidingBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        bus.private = PRIVATE
        await bus.connect()
        systemd = SystemdManager(bus, self.config.timeouts.systemd_job)
        await systemd.subscribe()

        accelerator = self.backend.accelerator()
        say_if_not_enforced()
        manager = VmManager(
            self.config,
            systemd,
            self.backend,
            self.run_dir,
            on_count_changed=lambda n: self._notify(f"STATUS={_status(n)}"),
        )
        export_manager(bus, manager, self.config, accelerator)
        await manager.recover()

        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise StartupError(
                f"cannot own {BUS_NAME} on the system bus: another spinboxd runs ({reply.name})"
            )
        # Their writebacks boot helper VMs: a bus activation must not wait for them.
        manager.start_cleanup()
        manager.templates.start()
        log.info(
            "serving %s with %s acceleration; %d VM(s) re-adopted", BUS_NAME, accelerator, len(manager.vms)
        )
        self._notify(f"READY=1\nSTATUS={_status(len(manager.vms))}")

        watchdog = loop.create_task(self._watchdog())
        stopped = loop.create_task(self._stop.wait())
        disconnected = loop.create_task(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        await asyncio.wait([stopped, disconnected], return_when=asyncio.FIRST_COMPLETED)
        self._notify("STOPPING=1\nSTATUS=stopping; VMs keep running")
        watchdog.cancel()
        if disconnected.done():
            log.error("lost the system bus connection")
        # VMs outlive spinboxd: only stop watching them. Half-made ones are
        # undone while the bus (and so systemd) is still reachable.
        await manager.abandon_creations()
        await manager.abandon_cleanup()
        await manager.templates.close()
        await manager.stop_all_watchers()
        for task in (stopped, disconnected):
            task.cancel()
        with contextlib.suppress(Exception):
            bus.disconnect()
        if disconnected.done() and not stopped.done():
            raise StartupError("lost the system bus connection")

    async def _watchdog(self) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if usec <= 0:
            return
        # Pinging from the event loop: a stuck loop means a missed ping.
        interval = usec / 1_000_000 / 3
        while True:
            self._notify("WATCHDOG=1")
            await asyncio.sleep(interval)
