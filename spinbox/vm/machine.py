"""A running VM: QEMU launched (or re-adopted), driven over QMP, stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError

from spinbox import procstat, statefile
from spinbox.vm import control
from spinbox.vm.accel import choose_accel
from spinbox.vm.cid import CID_DIR, CidLease, _try_lock, allocate_cid
from spinbox.vm.ending import Ending
from spinbox.vm.errors import VmError, VmNotRunning
from spinbox.vm.handover import Handover, VmUser, allocate_vm_user
from spinbox.vm.process import (
    ProcessHandle,
    QemuChild,
    Spawn,
    as_handle,
    send_signal,
    spawn_subprocess,
)
from spinbox.vm.qemu import HOTPLUG_FDSET_BASE, VHOST_VSOCK, QemuCommand, RuntimePaths, hotplug_port
from spinbox.vm.spec import Disk, VmSpec, check_disk

log = logging.getLogger(__name__)

QMP_TIMEOUT = 30.0
EVENTS = ("SHUTDOWN", "GUEST_PANICKED", "STOP", "RESUME")
# How long the guest may take to let go of a hot-unplugged disk.
UNPLUG_TIMEOUT = 30.0


@dataclass
class VmState:
    """What a later process needs to re-adopt the VM; the "machine" section of vm.json (spinbox.statefile)."""

    vm_id: str
    pid: int
    start_time: int | None
    accel: str
    agent_address: str
    control_address: str
    cid: int | None = None
    # Spare PCIe root ports, and the serial of the disk hot-plugged into each one in use.
    hotplug_ports: int = 0
    hotplugged: dict[str, str] = field(default_factory=dict)
    # time.monotonic() of each host-side phase ("exec", "qmp-up", "agent-ready").
    stamps: dict[str, float] = field(default_factory=dict)
    # CLOCK_BOOTTIME nanoseconds of each guest phase, from the agent's Ping.
    guest: dict[str, int] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        statefile.write_section(path, statefile.MACHINE, asdict(self))

    @classmethod
    def load(cls, path: Path) -> VmState:
        try:
            data = statefile.read_sections(path).get(statefile.MACHINE)
            if data is not None:
                return cls(**data)
        except FileNotFoundError:
            pass
        except (ValueError, TypeError) as error:
            raise VmError(f"VM state {path} is not readable: {error}") from None
        raise VmNotRunning(f"no VM state in {path.parent} ({path.name} names no QEMU)")


class VirtualMachine:
    """A QEMU process and its sockets. Use launch() or VirtualMachine.attach()."""

    def __init__(self, runtime_dir: Path, state: VmState, process: ProcessHandle, qmp: QMPClient) -> None:
        self.paths = RuntimePaths(runtime_dir)
        self.state = state
        self._process = process
        self._qmp = qmp
        # How QEMU ended, once it has: set before the exit is awaited.
        self.ending: Ending | None = None
        self._requested = ""
        self._panics = EventListener(("GUEST_PANICKED",))
        qmp.register_listener(self._panics)
        self._exit: asyncio.Task[int | None] = asyncio.ensure_future(self._watch_exit())

    # What callers read.

    @property
    def vm_id(self) -> str:
        return self.state.vm_id

    @property
    def pid(self) -> int:
        return self.state.pid

    @property
    def accel(self) -> str:
        return self.state.accel

    @property
    def agent_address(self) -> str:
        return self.state.agent_address

    @property
    def control_address(self) -> str:
        return self.state.control_address

    @property
    def console_socket(self) -> Path:
        return self.paths.console

    @property
    def log_socket(self) -> Path:
        return self.paths.log

    @property
    def qmp_socket(self) -> Path:
        return self.paths.qmp

    @property
    def timeline(self) -> dict[str, float]:
        """Seconds since QEMU's exec of each host phase, and seconds since guest boot of each guest phase."""
        start = self.state.stamps.get("exec", 0.0)
        phases = {name: stamp - start for name, stamp in self.state.stamps.items()}
        phases.update({f"guest-{name}": ns / 1e9 for name, ns in self.state.guest.items()})
        return phases

    @property
    def exited(self) -> bool:
        return self._exit.done()

    # Re-adoption.

    @classmethod
    async def attach(cls, runtime_dir: Path) -> VirtualMachine:
        """Re-adopt a VM started by an earlier process; VmNotRunning if its QEMU is gone."""
        paths = RuntimePaths(runtime_dir)
        state = VmState.load(paths.state)
        if state.start_time is None or procstat.start_time(state.pid) != state.start_time:
            _remove_runtime_files(paths, state.cid)
            raise VmNotRunning(f"VM {state.vm_id}'s QEMU (pid {state.pid}) is not running any more")
        process = as_handle(state.pid)
        qmp = await _connect_qmp(paths.qmp, process, QMP_TIMEOUT)
        # The process that started it may have left the guest answering on its channel.
        control.unsettled(state.control_address)
        return cls(runtime_dir, state, process, qmp)

    # Control.

    async def status(self) -> str:
        """QEMU's run state, e.g. "running", "paused", "prelaunch", "shutdown"."""
        reply = await self._execute("query-status")
        return str(reply["status"])

    async def pause(self) -> None:
        await self._execute("stop")

    async def resume(self) -> None:
        await self._execute("cont")

    async def add_disk(self, disk: Disk) -> None:
        """Hot-plug a disk into a spare PCIe root port; the guest finds it by serial."""
        check_disk(disk)
        if disk.serial in self.state.hotplugged.values():
            raise VmError(f"VM {self.vm_id} already has a hot-plugged disk with serial {disk.serial!r}")
        free = [i for i in range(self.state.hotplug_ports) if hotplug_port(i) not in self.state.hotplugged]
        if not self.state.hotplug_ports:
            raise VmError(
                f"VM {self.vm_id} has no spare PCIe ports to plug disk {disk.serial!r} into "
                "(a VM gets them at its start: VmSpec.hotplug_ports, CreateVM's hotplug-ports)"
            )
        if not free:
            raise VmError(
                f"VM {self.vm_id} has no spare PCIe port left for disk {disk.serial!r} "
                f"(all {self.state.hotplug_ports} are in use)"
            )
        port = hotplug_port(free[0])
        node, device, fdset = f"{port}-drive", f"{port}-blk", _hotplug_fdset(free[0])
        # QEMU gets the image as a descriptor (spinbox.vm.handover): SCM_RIGHTS, then add-fd.
        with Handover() as files:
            fd = files.file(disk.path, writable=not disk.read_only)
            if self.exited:
                raise VmNotRunning(f"VM {self.vm_id} is not running")
            self._qmp.send_fd_scm(fd)
            await self._execute("add-fd", {"fdset-id": fdset})
        try:
            await self._execute(
                "blockdev-add",
                {
                    "driver": "raw",
                    "node-name": node,
                    "read-only": disk.read_only,
                    "file": {
                        "driver": "file",
                        "filename": f"/dev/fdset/{fdset}",
                        "read-only": disk.read_only,
                    },
                },
            )
            try:
                await self._execute(
                    "device_add",
                    {
                        "driver": "virtio-blk-pci",
                        "id": device,
                        "drive": node,
                        "serial": disk.serial,
                        "bus": port,
                    },
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    await self._execute("blockdev-del", {"node-name": node})
                raise
        except BaseException:
            with contextlib.suppress(Exception):
                await self._execute("remove-fd", {"fdset-id": fdset})
            raise
        self.state.hotplugged[port] = disk.serial
        self._save()

    async def remove_disk(self, serial: str, timeout: float = UNPLUG_TIMEOUT) -> None:  # noqa: ASYNC109
        """Unplug a hot-plugged disk (the guest must have unmounted it) and close its image."""
        port = next((p for p, s in self.state.hotplugged.items() if s == serial), None)
        if port is None:
            raise VmError(f"VM {self.vm_id} has no hot-plugged disk with serial {serial!r}")
        node, device = f"{port}-drive", f"{port}-blk"
        listener = EventListener(("DEVICE_DELETED",))
        self._qmp.register_listener(listener)
        try:
            await self._execute("device_del", {"id": device})
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    raise VmError(
                        f"VM {self.vm_id}: the guest did not release disk {serial!r} within {timeout:g} s"
                    )
                get = asyncio.ensure_future(listener.get())
                await asyncio.wait({get, self._exit}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    if self.exited:
                        raise VmNotRunning(f"VM {self.vm_id} is not running")
                    continue
                data = get.result().get("data")
                if isinstance(data, dict) and data.get("device") == device:
                    break
        finally:
            self._qmp.remove_listener(listener)
        await self._execute("blockdev-del", {"node-name": node})
        await self._execute("remove-fd", {"fdset-id": _hotplug_fdset(int(port.removeprefix("hp")))})
        del self.state.hotplugged[port]
        self._save()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """A QMP command; VmError names it when QEMU refuses."""
        return await self._execute(command, arguments)

    async def send_fd(self, name: str, fd: int) -> None:
        """Hand QEMU an open file as `name` (QMP getfd over the socket's SCM_RIGHTS)."""
        if self.exited:
            raise VmNotRunning(f"VM {self.vm_id} is not running")
        self._qmp.send_fd_scm(fd)
        await self._execute("getfd", {"fdname": name})

    def mark_plugged(self, port: str, name: str) -> None:
        """Record a device plugged into a spare port by other means than add_disk."""
        self.state.hotplugged[port] = name
        self._save()

    def events(self) -> EventStream:
        """QMP events (SHUTDOWN, GUEST_PANICKED, STOP, RESUME) from now on, until QEMU exits."""
        return EventStream(self._qmp, self._exit)

    def agent_answered(self) -> None:
        """Record that the agent has answered a request (a restored VM's Refresh): the VM is
        ready, and wait_ready need not ask again."""
        self.state.stamps.setdefault("agent-ready", time.monotonic())
        self._save()

    async def wait_ready(self, timeout: float) -> dict[str, float]:  # noqa: ASYNC109 (the contract's name)
        """Wait until the agent answers Ping on the control channel (at once if it has answered
        already); return the timeline."""
        if "agent-ready" in self.state.stamps and not self.exited:
            return self.timeline
        ping = asyncio.ensure_future(control.ping(self.control_address))
        try:
            done, _ = await asyncio.wait(
                {ping, self._exit}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            # Cancelled (a CreateVM given up): the Ping goes too, its connection closed.
            await _cancel(ping)
            raise
        if ping not in done:
            await _cancel(ping)
            if self._exit in done:
                raise VmError(f"VM {self.vm_id} stopped before its agent was ready{self._exit_detail()}")
            raise VmError(f"VM {self.vm_id}'s agent did not answer within {timeout:g} s")
        try:
            guest = ping.result()
        except Exception as error:
            # A guest that dies (kernel panic, PID 1 exiting) drops the connection first.
            await asyncio.wait({self._exit}, timeout=2)
            if self.exited:
                raise VmError(
                    f"VM {self.vm_id} stopped before its agent was ready{self._exit_detail()}"
                ) from None
            raise VmError(
                f"VM {self.vm_id}'s agent did not answer Ping at {self.control_address}: {error}"
            ) from None
        self.state.stamps["agent-ready"] = time.monotonic()
        self.state.guest = guest
        self._save()
        return self.timeline

    async def shutdown(self, timeout: float = 10.0) -> int | None:  # noqa: ASYNC109 (the contract's name)
        """Stop the VM: the agent's orderly Shutdown, then QMP quit, then SIGKILL. Returns QEMU's status."""
        if self.exited:
            return await self._exit
        self._requested = self._requested or "stop"
        if "agent-ready" in self.state.stamps and await self._running():
            try:
                async with asyncio.timeout(timeout):
                    await control.shutdown(self.control_address)
            except Exception as error:
                log.warning("VM %s: the agent's Shutdown failed (%s); stopping QEMU", self.vm_id, error)
            # Once the agent has answered, the guest has ended its processes and unmounted and
            # synced its file systems: nothing in it is left to keep, so QEMU quits at once
            # rather than after the guest kernel's power-off.
        with contextlib.suppress(QMPError, OSError, EOFError, asyncio.TimeoutError):
            async with asyncio.timeout(5):
                await self._qmp.execute("quit")
        if await self._exited_by(asyncio.get_running_loop().time() + 5):
            return await self._exit
        return await self.kill()

    async def kill(self) -> int | None:
        if not self.exited:
            self._requested = "kill"
            send_signal(self.pid, signal.SIGKILL)
        return await self._exit

    async def wait_exit(self) -> int | None:
        return await asyncio.shield(self._exit)

    async def detach(self) -> None:
        """Stop watching the VM without stopping it (e.g. spinboxd exiting for a restart)."""
        self._exit.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._exit
        await self._qmp.disconnect()

    # Internals.

    def _save(self) -> None:
        self.state.save(self.paths.state)

    async def _execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = await self.query(command, arguments)
        return reply if isinstance(reply, dict) else {}

    async def query(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """A QMP command's reply as QEMU gives it (some are lists); VmError names a refusal."""
        if self.exited:
            raise VmNotRunning(f"VM {self.vm_id} is not running")
        try:
            async with asyncio.timeout(QMP_TIMEOUT):
                reply = await self._qmp.execute(command, arguments)
        except QMPError as error:
            raise VmError(f"VM {self.vm_id}: QMP {command} failed: {error}") from None
        except TimeoutError:
            raise VmError(
                f"VM {self.vm_id}: QEMU did not answer QMP {command} within {QMP_TIMEOUT:g} s"
            ) from None
        return reply

    async def _running(self) -> bool:
        try:
            return await self.status() == "running"
        except (VmError, OSError, EOFError):
            return False

    async def _exited_by(self, deadline: float) -> bool:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining > 0:
            await asyncio.wait({self._exit}, timeout=remaining)
        return self.exited

    async def _watch_exit(self) -> int | None:
        status = await self._process.wait()
        panicked = not self._panics.empty()
        if not panicked and status == 1:
            # With panic=exit-failure QEMU exits 1 right after its GUEST_PANICKED event.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await self._panics.get()
                panicked = True
        self.ending = Ending(status, panicked, self._requested)
        log.info("VM %s: %s (QEMU exit status %s)", self.vm_id, self.ending.reason, status)
        with contextlib.suppress(Exception):
            await self._qmp.disconnect()
        _remove_runtime_files(self.paths, self.state.cid)
        control.forget(self.state.control_address)
        return status

    def _exit_detail(self) -> str:
        status = self._exit.result() if self._exit.done() and not self._exit.cancelled() else None
        detail = f" (QEMU exit status {status})" if status is not None else ""
        if isinstance(self._process, QemuChild) and self._process.tail:
            detail += ": " + " / ".join(self._process.tail)
        return detail


def _hotplug_fdset(index: int) -> int:
    """The fd set of the disk in the index-th hot-plug port (the command line's sets count from 1)."""
    return HOTPLUG_FDSET_BASE + index


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel the task and wait until it has ended, retrieving whatever it raised."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


class EventStream:
    """QMP events received since the stream was made; close it (aclose) when done."""

    def __init__(self, qmp: QMPClient, exited: asyncio.Task[int | None]) -> None:
        self._qmp = qmp
        self._exited = exited
        self._listener = EventListener(EVENTS)
        qmp.register_listener(self._listener)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._listener.empty():
            get = asyncio.ensure_future(self._listener.get())
            await asyncio.wait({get, self._exited}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                if self._listener.empty():  # events arrive before QEMU's exit is seen
                    await self.aclose()
                    raise StopAsyncIteration
            else:
                return dict(get.result())
        return dict(await self._listener.get())

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            self._qmp.remove_listener(self._listener)


async def launch(spec: VmSpec, spawn: Spawn | None = None, *, start: bool = True) -> VirtualMachine:
    """Start QEMU for spec and connect QMP. With start=False the guest stays paused until resume()."""
    command, lease = _prepare(spec)
    accel = command.accel
    paths = command.paths
    exec_time = time.monotonic()
    try:
        with Handover() as files:
            argv = command.argv(files)
            process = as_handle(await (spawn or spawn_subprocess)(argv, (*command.pass_fds, *files.fds)))
    except BaseException:
        if lease:
            lease.release()
        _remove_runtime_files(paths, None)
        raise
    finally:
        if lease:
            lease.close()  # QEMU holds the CID's lock from here on
        if command.user is not None:
            command.user.close()  # and its uid's
    state = VmState(
        vm_id=spec.vm_id,
        pid=process.pid,
        start_time=procstat.start_time(process.pid),
        accel=accel,
        agent_address=command.agent_address,
        control_address=command.control_address,
        cid=lease.cid if lease else None,
        hotplug_ports=spec.hotplug_ports,
        stamps={"exec": exec_time},
    )
    state.save(paths.state)
    try:
        qmp = await _connect_qmp(paths.qmp, process, QMP_TIMEOUT)
    except BaseException:
        send_signal(process.pid, signal.SIGKILL)
        status = await process.wait()
        _remove_runtime_files(paths, state.cid)
        tail = process.tail if isinstance(process, QemuChild) else ()
        raise VmError(
            f"QEMU for VM {spec.vm_id} failed to start (exit status {status})"
            + (": " + " / ".join(tail) if tail else "")
        ) from None
    state.stamps["qmp-up"] = time.monotonic()
    vm = VirtualMachine(spec.runtime_dir, state, process, qmp)
    vm._save()
    if start:
        try:
            await vm.resume()
        except BaseException:
            await vm.kill()
            raise
    return vm


def _prepare(spec: VmSpec) -> tuple[QemuCommand, CidLease | None]:
    """Validate, make the runtime directory, and take a vsock CID if the host has vsock."""
    spec.validate()
    accel = choose_accel(spec.accel)
    paths = RuntimePaths(spec.runtime_dir)
    spec.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _refuse_running(paths)
    for sock in paths.sockets():
        sock.unlink(missing_ok=True)
    # A template's guest and the VMs restored from it talk over virtio-serial:
    # a vsock CID is part of the saved device state.
    vsock = VHOST_VSOCK.exists() and spec.memory_file is None
    lease = allocate_cid() if vsock else None
    user: VmUser | None = None
    try:
        if spec.confine:
            user = allocate_vm_user(kvm=accel == "kvm", base=spec.uid_base)
    except BaseException:
        if lease:
            lease.release()
        raise
    command = QemuCommand(
        spec,
        accel=accel,
        vsock_cid=lease.cid if lease else None,
        keep_fds=(lease.fd,) if lease else (),
        user=user,
    )
    return command, lease


def _exists(path: Path) -> bool:
    return path.exists()


async def _connect_qmp(path: Path, process: ProcessHandle, timeout: float) -> QMPClient:  # noqa: ASYNC109
    """Connect to QEMU's QMP socket, retrying while QEMU creates it; fail if QEMU exits first."""
    exited = asyncio.ensure_future(process.wait())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            if _exists(path):  # connecting earlier only makes qemu.qmp log errors
                qmp = QMPClient(f"spinbox-vm-{path.parent.name}")
                try:
                    # The socket listens from before QEMU's start: the greeting comes once QEMU accepts.
                    async with asyncio.timeout(max(deadline - loop.time(), 0.1)):
                        await qmp.connect(str(path))
                    return qmp
                except (QMPError, TimeoutError):
                    await qmp.disconnect()
            if exited.done():
                raise VmError(f"QEMU exited before its QMP socket {path} came up")
            if loop.time() > deadline:
                raise VmError(f"QEMU's QMP socket {path} did not come up within {timeout:g} s")
            await asyncio.wait({exited}, timeout=0.02)
    finally:
        if not exited.done():
            exited.cancel()


def _refuse_running(paths: RuntimePaths) -> None:
    try:
        state = VmState.load(paths.state)
    except VmError:
        return
    if state.start_time is not None and procstat.start_time(state.pid) == state.start_time:
        raise VmError(f"VM {state.vm_id} is already running in {paths.root} (QEMU pid {state.pid})")


def _remove_runtime_files(paths: RuntimePaths, cid: int | None) -> None:
    for path in paths.sockets():
        path.unlink(missing_ok=True)
    statefile.remove_section(paths.state, statefile.MACHINE)
    if cid is not None:
        lease = _try_lock(CID_DIR / str(cid), cid)
        if lease is not None:
            lease.release()
    with contextlib.suppress(OSError):
        paths.root.rmdir()  # only if empty: the caller may keep its own files there
