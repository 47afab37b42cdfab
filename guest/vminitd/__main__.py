"""vminitd's entry point: PID 1 in the guest, or the agent alone on a host.

As PID 1 it boots the guest (boot.py), serves the agent on the channels the
kernel command line names, and powers off after Shutdown. It never returns
while it is PID 1: PID 1 exiting panics the kernel.

On a host (tests, debugging): `python -m guest.vminitd --listen unix:PATH --state-dir DIR`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from guest.vminitd import boot, channels, hotplug, syscalls
from guest.vminitd.config import RuntimeConfig
from guest.vminitd.reaper import Reaper
from guest.vminitd.service import AgentConfig, AgentService
from guest.vminitd.timeline import Timeline
from spinbox.ttrpc import Server

if TYPE_CHECKING:
    from argparse import Namespace

log = logging.getLogger("vminitd")

GUEST_STATE = Path("/run/spinbox")
PORT_WAIT = 10.0


async def _wait_port(name: str) -> Path | None:
    """The port's device; devtmpfs adds it shortly after virtio_console probes."""
    deadline = time.monotonic() + PORT_WAIT
    while (path := channels.find_port(name)) is None or not path.exists():
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.02)
    return path


async def run_guest(
    timeline: Timeline,
    cmdline: dict[str, str],
    log_handler: channels.PortLogHandler,
    devices: concurrent.futures.Future[None] | None,
    fixed_layout: bool = False,
) -> None:
    boot_memory = hotplug.BootMemory.read()  # nothing is plugged before the agent listens
    reaper = Reaper()
    reaper.start()
    runtime = RuntimeConfig(
        state_dir=GUEST_STATE,
        rootfs_dir=GUEST_STATE / "rootfs",
        no_pivot=boot.root_is_initramfs(),
        default_personality=fixed_layout,
    )
    config = AgentConfig(runtime=runtime, mnt_dir=GUEST_STATE / "mnt")
    ready = asyncio.wrap_future(devices) if devices is not None else None
    service = AgentService(config, reaper, timeline, devices=ready, boot_memory=boot_memory)
    server = Server()
    service.register(server)
    tasks = []
    log_port = await _wait_port(channels.LOG_PORT)
    if log_port is not None:
        tasks.append(asyncio.ensure_future(log_handler.run(log_port)))
    agent = cmdline.get("spinbox.agent", "serial")
    if agent.startswith("vsock:"):
        await server.serve_vsock(int(agent.removeprefix("vsock:")))
    else:
        for name in (channels.AGENT_PORT, channels.CONTROL_PORT):
            port = await _wait_port(name)
            if port is None:
                log.error("no virtio-serial port named %s", name)
                continue
            tasks.append(asyncio.ensure_future(channels.serve_port(server, port)))
    timeline.stamp("agent-listening")
    boot.stamp_init_exec(timeline)  # before the first request is read: Ping answers with the stamps
    log.info("agent listening (%s); boot took %.2f s", agent, timeline.stamps["agent-listening"] / 1e9)
    await service.stopped.wait()
    await asyncio.sleep(0.3)  # let the Shutdown reply and the last log lines out
    for task in tasks:
        task.cancel()


def pid1() -> None:
    timeline = Timeline()
    timeline.stamp("entry")
    # Ctrl-C on the console must not stop PID 1 (children get the default back at spawn).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    log_handler = channels.PortLogHandler()
    logging.basicConfig(level=logging.INFO, format="vminitd: %(message)s", stream=sys.stderr)
    log_handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().addHandler(log_handler)
    devices = None
    fixed_layout = False
    try:
        boot.mount_filesystems()
        cmdline = boot.kernel_cmdline()
        log.info("vminitd starting for VM %s", cmdline.get("spinbox.vm", "?"))
        fixed_layout = boot.fix_tool_layout(cmdline)
        early, deferred = boot.read_module_list()
        if cmdline.get("spinbox.agent", "serial").startswith("vsock:"):
            early, deferred = early + deferred, []  # vsock's modules are not among the early ones
        log.info("loaded %d kernel modules", boot.load_modules(early))
        timeline.stamp("modules")
        # Block devices, network, file systems and entropy come up while the agent starts.
        devices = boot.start_deferred_boot(deferred, timeline, cmdline)
        boot.enable_cgroup_controllers()
        boot.allow_sysrq_dumps()
        boot.loopback_up()
    except BaseException:
        log.exception("boot failed; serving the agent anyway")
        cmdline = {}
    while True:
        try:
            asyncio.run(run_guest(timeline, cmdline, log_handler, devices, fixed_layout))
            break
        except BaseException:
            log.exception("the agent failed; restarting it")
            time.sleep(1)
    log.info("powering off")
    while True:
        try:
            syscalls.power_off()
        except BaseException:
            log.exception("power off failed")
        time.sleep(5)


async def run_host(args: Namespace) -> None:
    timeline = Timeline()
    timeline.stamp("entry")
    syscalls.set_child_subreaper()
    reaper = Reaper()
    reaper.start()
    state = Path(args.state_dir)
    runtime = RuntimeConfig(
        state_dir=state,
        rootfs_dir=Path(args.rootfs_dir) if args.rootfs_dir else state / "rootfs",
        crun=args.crun,
        crun_args=tuple(args.crun_arg),
        no_pivot=args.no_pivot,
        cgroup_parent=args.cgroup_parent,
    )
    service = AgentService(AgentConfig(runtime=runtime, mnt_dir=state / "mnt"), reaper, timeline)
    server = Server()
    service.register(server)
    for address in args.listen:
        if not address.startswith("unix:"):
            raise SystemExit(f"vminitd: --listen {address}: only unix:<path> is supported on a host")
        await server.serve_unix(address.removeprefix("unix:"))
    timeline.stamp("agent-listening")
    log.info("agent listening on %s", ", ".join(args.listen))
    await service.stopped.wait()
    await server.close()
    reaper.stop()


def main() -> None:
    if os.getpid() == 1:
        pid1()
        return
    import argparse  # only off the guest: PID 1 does not pay for it

    parser = argparse.ArgumentParser(prog="vminitd", description="The spinbox guest agent, outside a VM.")
    parser.add_argument("--listen", action="append", required=True, help="unix:<path> to serve the agent on")
    parser.add_argument("--state-dir", required=True, help="bundles, crun state and mounts go here")
    parser.add_argument(
        "--rootfs-dir", help="container rootfs directories (<dir>/<id>); default: STATE/rootfs"
    )
    parser.add_argument("--crun", default="/usr/bin/crun")
    parser.add_argument(
        "--crun-arg", action="append", default=[], help="a global crun option, e.g. --cgroup-manager=disabled"
    )
    parser.add_argument("--no-pivot", action="store_true", help="run crun create with --no-pivot")
    parser.add_argument(
        "--cgroup-parent", default="spinbox", help="containers' cgroup parent; empty: no cgroups"
    )
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="vminitd: %(message)s")
    asyncio.run(run_host(args))


if __name__ == "__main__":
    main()
