"""The lifecycle of containers and their processes: create, start, signal,
wait, delete; their exits (from the Reaper) and OOM kills as events.

A container is a bundle (config.json whose root is the rootfs MountRootfs made)
plus its init process; exec processes join it. crun runs them (crun.py), with
the spec rewritten for the guest (spec.py) and their stdio (process_stdio.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guest.vminitd import apparmor, stats, syscont, validate
from guest.vminitd.config import RuntimeConfig
from guest.vminitd.crun import Crun, CrunError
from guest.vminitd.process_stdio import Stdio
from guest.vminitd.reaper import Reaper
from guest.vminitd.share import Share
from guest.vminitd.spec import check_program, prepare_spec
from guest.vminitd.stdio import InputPipe, OutputPipe
from guest.vminitd.syscalls import set_window_size
from spinbox.api.proto import agent_pb2 as pb
from spinbox.ttrpc import Code, TtrpcError

log = logging.getLogger(__name__)


@dataclass
class Process:
    container_id: str
    exec_id: str
    io: pb.IoConfig
    spec: dict[str, Any] = field(default_factory=dict)  # the OCI process of an exec
    pid: int = 0
    started: bool = False
    status: int | None = None  # exit code (128+N for signal N) once exited
    exited_at: float = 0.0
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once the stdio exists (after crun create or exec), or will never exist.
    io_ready: asyncio.Event = field(default_factory=asyncio.Event)
    stdin: InputPipe | None = None
    stdout: OutputPipe | None = None
    stderr: OutputPipe | None = None
    pty: int | None = None

    @property
    def name(self) -> str:
        if self.exec_id:
            return f"exec {self.exec_id} of container {self.container_id}"
        return f"container {self.container_id}"

    def close_io(self) -> None:
        for out in (self.stdout, self.stderr):
            if out is not None:
                out.close()
        if self.stdin is not None and not self.stdin.closed:
            self.stdin.closed = True
            os.close(self.stdin.fd)
        if self.pty is not None:
            os.close(self.pty)
            self.pty = None


@dataclass
class Container:
    id: str
    bundle: Path
    rootfs: Path
    init: Process
    cgroup: Path | None
    execs: dict[str, Process] = field(default_factory=dict)
    oom_kills: int = 0
    systemd: bool = False  # its init is systemd (syscont)
    # Its init is PID 1 of a PID namespace of its own, whose end kills every process in it.
    own_pid_namespace: bool = True

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise TtrpcError(Code.NOT_FOUND, f"container {self.id} has no exec {exec_id!r}") from None


def owns_pid_namespace(doc: dict[str, Any]) -> bool:
    """Whether the spec gives the container a PID namespace of its own (not one joined by path)."""
    namespaces = doc.get("linux", {}).get("namespaces", [])
    return any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)


def kill_the_rest(container: Container) -> None:
    """SIGKILLs every process left in the cgroup of a container whose init exited, as the end of
    a PID namespace of its own would: in its pod's namespace they would outlive it (and hold its
    output open). Done before the exit is reported, as runc's shim does."""
    if container.cgroup is None:
        log.warning(
            "container %s: its init exited; without a cgroup its other processes live on", container.id
        )
        return
    try:
        left = (container.cgroup / "cgroup.procs").read_text().split()
    except FileNotFoundError:
        return  # its cgroup is gone, and every process with it
    except OSError as e:
        log.warning("container %s: cannot list the processes its init left: %s", container.id, e.strerror)
        return
    if not left:
        return
    try:
        (container.cgroup / "cgroup.kill").write_text("1")
    except OSError as e:
        log.warning(
            "container %s: cannot kill the processes its init left (%s): %s",
            container.id,
            " ".join(left),
            e.strerror,
        )
        return
    log.info(
        "container %s: its init exited; killed the %d processes left in its cgroup (%s)",
        container.id,
        len(left),
        " ".join(left),
    )


def processes_left(container: Container) -> bool:
    """Whether any process may be left in the container (its cgroup not known or not empty)."""
    if container.cgroup is None:
        return True
    try:
        return bool((container.cgroup / "cgroup.procs").read_text().split())
    except FileNotFoundError:
        return False
    except OSError:
        return True


class Containers:
    def __init__(self, config: RuntimeConfig, reaper: Reaper) -> None:
        self.config = config
        self.reaper = reaper
        self.containers: dict[str, Container] = {}
        self._subscribers: set[asyncio.Queue[pb.Event]] = set()
        self._counter = itertools.count()
        self._oom_task: asyncio.Task[None] | None = None
        self.crun = Crun(config, reaper)
        self.bundles = config.state_dir / "bundles"
        self.consoles = config.state_dir / "console"
        self.share = Share(config.state_dir / "share")
        self.consoles.mkdir(parents=True, exist_ok=True)

    # crun

    def get(self, container_id: str) -> Container:
        validate.container_id(container_id)
        try:
            return self.containers[container_id]
        except KeyError:
            raise TtrpcError(Code.NOT_FOUND, f"no container {container_id}") from None

    def find(self, container_id: str, exec_id: str) -> tuple[Container, Process]:
        """A container and one of its processes, after checking both names."""
        validate.container_id(container_id)
        validate.exec_id(exec_id)
        container = self.get(container_id)
        return container, container.process(exec_id)

    def init_pids(self) -> dict[int, str]:
        """The pid of every container's live init process, with the container's id."""
        return {
            c.init.pid: c.id for c in self.containers.values() if c.init.pid and not c.init.exited.is_set()
        }

    # Lifecycle

    async def create(self, req: pb.CreateContainerRequest) -> Container:
        cid = validate.container_id(req.container_id)
        doc = validate.spec(req.spec)
        if cid in self.containers:
            raise TtrpcError(Code.ALREADY_EXISTS, f"container {cid} already exists")
        rootfs = self.config.rootfs_dir / cid
        if not rootfs.is_dir():
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {cid} has no rootfs: mount it first")
        prepare_spec(self.config, cid, doc, rootfs, req.io.terminal, self.init_pids())
        check_program(rootfs, doc, doc["process"], f"container {cid}")
        apparmor.prepare(doc["process"], req.apparmor_policy, f"container {cid}")
        systemd = syscont.prepare(cid, doc, rootfs)
        self.share.apply(cid, doc, req.shared)
        bundle = self.bundles / cid
        if bundle.exists():
            shutil.rmtree(bundle)
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text(json.dumps(doc))
        cgroup = None
        if self.config.cgroup_parent:
            cgroup = self.config.cgroup_root / self.config.cgroup_parent / cid
        init = Process(cid, "", req.io)
        container = Container(
            cid, bundle, rootfs, init, cgroup, systemd=systemd, own_pid_namespace=owns_pid_namespace(doc)
        )
        self.containers[cid] = container
        try:
            await self._spawn(container, init, ["create", "--bundle", str(bundle)])
        except BaseException:
            del self.containers[cid]
            with contextlib.suppress(CrunError):
                await self.crun.run("delete", "--force", cid)
            shutil.rmtree(bundle, ignore_errors=True)
            raise
        self._ensure_oom_watch()
        log.info("created container %s (pid %d)", cid, init.pid)
        return container

    async def _spawn(self, container: Container, proc: Process, command: list[str]) -> None:
        """Runs `crun create` or `crun exec` for `proc` with its stdio; sets its pid."""
        work = container.bundle / (f"exec-{proc.exec_id}" if proc.exec_id else "init")
        work.mkdir(parents=True, exist_ok=True)
        pid_file = work / "pid"
        # Short and unique: a socket path must fit in 108 bytes, whatever the ids' length.
        stdio = Stdio(proc.io, self.consoles / f"{next(self._counter)}.sock")
        args = [*command, "--pid-file", str(pid_file)]
        if stdio.console is not None:
            args += ["--console-socket", str(stdio.console_path)]
        if command[0] == "create" and self.config.no_pivot:
            args.append("--no-pivot")
        if command[0] == "exec":
            process_file = work / "process.json"
            process_file.write_text(json.dumps(proc.spec))
            args += ["--detach", "--process", str(process_file)]
            if proc.io.terminal:
                args.append("--tty")
        args.append(container.id)
        try:
            crun = asyncio.ensure_future(
                self.crun.run(*args, stdio=(stdio.child[0], stdio.child[1], stdio.child[2]))
            )
            pty = None
            if stdio.console is not None:
                pty = await stdio.receive_pty(crun)
            await crun
            if proc.io.terminal and pty is None:
                raise TtrpcError(Code.INTERNAL, f"crun sent no terminal for {proc.name}")
            stdio.close_child_ends()
            pid = int(pid_file.read_text().strip())
        except CrunError as e:
            stdio.discard()
            proc.io_ready.set()
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{proc.name}: {e}") from None
        except BaseException:
            stdio.discard()
            proc.io_ready.set()
            raise
        stdio.attach(proc, pty)
        proc.io_ready.set()
        proc.pid = pid
        exited = self.reaper.watch(pid)
        exited.add_done_callback(lambda f: self._exited(container, proc, f.result()))

    def _exited(self, container: Container, proc: Process, status: int) -> None:
        proc.status = syscont.init_exit_code(status, container.systemd and proc is container.init)
        proc.exited_at = time.time()
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.closed = True
            os.close(proc.stdin.fd)
        if proc is container.init:
            self._check_oom(container)
            if not container.own_pid_namespace:
                kill_the_rest(container)
        proc.exited.set()
        log.info("%s (pid %d) exited with status %d", proc.name, proc.pid, proc.status)

    async def add_exec(self, req: pb.ExecRequest) -> Process:
        container = self.get(req.container_id)
        eid = validate.exec_id(req.exec_id)
        if not eid:
            raise validate.InvalidRequest("an exec needs a non-empty exec id")
        if eid in container.execs:
            raise TtrpcError(Code.ALREADY_EXISTS, f"container {container.id} already has exec {eid}")
        spec = validate.process(validate.json_object(req.process, "exec process"), "the exec process")
        spec["terminal"] = req.io.terminal
        check_program(container.rootfs, {}, spec, f"exec {eid}")
        apparmor.prepare(spec, req.apparmor_policy, f"exec {eid} of container {container.id}")
        proc = Process(container.id, eid, req.io, spec)
        container.execs[eid] = proc
        return proc

    async def start(self, container_id: str, exec_id: str) -> Process:
        container, proc = self.find(container_id, exec_id)
        if proc.started:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{proc.name} was already started")
        if proc.exited.is_set():
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{proc.name} has already exited")
        proc.started = True
        try:
            if exec_id:
                if container.init.exited.is_set():
                    raise TtrpcError(Code.FAILED_PRECONDITION, f"container {container_id} is not running")
                await self._spawn(container, proc, ["exec"])
            else:
                await self.crun.run("start", container_id)
        except CrunError as e:
            proc.started = False
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{proc.name}: {e}") from None
        except BaseException:
            proc.started = False
            raise
        return proc

    async def signal(self, req: pb.SignalRequest) -> None:
        sig = validate.signal_number(req.signal)
        container, proc = self.find(req.container_id, req.exec_id)
        if req.all:
            try:
                await self.crun.run("kill", "--all", container.id, str(sig))
            except CrunError as e:
                raise TtrpcError(Code.FAILED_PRECONDITION, str(e)) from None
            return
        if not proc.pid:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{proc.name} has not started")
        if proc.exited.is_set():
            raise TtrpcError(Code.NOT_FOUND, f"{proc.name} has already exited")
        # Safe: the pid is not reaped yet (exits are reaped on this loop), so it is not reused.
        os.kill(proc.pid, syscont.stop_signal(sig, container.systemd and proc is container.init))

    async def wait(self, container_id: str, exec_id: str) -> Process:
        _, proc = self.find(container_id, exec_id)
        await proc.exited.wait()
        return proc

    def resize(self, req: pb.ResizePtyRequest) -> None:
        _, proc = self.find(req.container_id, req.exec_id)
        width, height = validate.window_size(req.width, req.height)
        if proc.pty is None:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{proc.name} has no terminal")
        set_window_size(proc.pty, height, width)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        _, proc = self.find(container_id, exec_id)
        if proc.stdin is not None:
            await proc.stdin.close()

    async def delete_process(self, container_id: str, exec_id: str) -> Process:
        container, proc = self.find(container_id, exec_id)
        if proc.started and not proc.exited.is_set():
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{proc.name} is still running")
        if exec_id:
            proc.close_io()
            proc.io_ready.set()
            del container.execs[exec_id]
            shutil.rmtree(container.bundle / f"exec-{exec_id}", ignore_errors=True)
        else:
            await self._remove(container, force=not proc.started)
        return proc

    async def delete_container(self, container_id: str) -> None:
        await self._remove(self.get(container_id), force=True)

    async def _remove(self, container: Container, force: bool) -> None:
        args = ["delete", "--force", container.id] if force else ["delete", container.id]
        try:
            await self.crun.run(*args)
        except CrunError as e:
            if not force:
                raise TtrpcError(Code.FAILED_PRECONDITION, str(e)) from None
            log.warning("container %s: %s", container.id, e)
        self._forget(container)

    def _forget(self, container: Container) -> None:
        for proc in [container.init, *container.execs.values()]:
            proc.close_io()
            proc.io_ready.set()
        self.containers.pop(container.id, None)
        shutil.rmtree(container.bundle, ignore_errors=True)
        self.share.release(container.id)
        log.info("deleted container %s", container.id)

    def pids(self, container_id: str) -> list[pb.ProcessInfo]:
        container = self.get(container_id)
        known = {p.pid: p.exec_id for p in [container.init, *container.execs.values()] if p.pid}
        pids: list[int] = []
        if container.cgroup is not None:
            with contextlib.suppress(OSError):
                pids = [int(x) for x in (container.cgroup / "cgroup.procs").read_text().split()]
        if not pids:
            pids = [pid for pid, eid in known.items() if not container.process(eid).exited.is_set()]
        return [pb.ProcessInfo(pid=pid, exec_id=known.get(pid, "")) for pid in sorted(pids)]

    async def pause(self, container_id: str, resume: bool = False) -> None:
        container = self.get(container_id)
        try:
            await self.crun.run("resume" if resume else "pause", container.id)
        except CrunError as e:
            raise TtrpcError(Code.FAILED_PRECONDITION, str(e)) from None

    def stats(self, container_id: str) -> bytes:
        container = self.get(container_id)
        if container.cgroup is None or not container.cgroup.is_dir():
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {container_id} has no cgroup to read")
        return stats.metrics(container.cgroup)

    async def update(self, req: pb.UpdateResourcesRequest) -> None:
        container = self.get(req.container_id)
        validate.resources(req.resources)
        path = container.bundle / f"resources-{next(self._counter)}.json"
        path.write_bytes(req.resources)
        try:
            await self.crun.run("update", "--resources", str(path), container.id)
        except CrunError as e:
            raise TtrpcError(Code.INVALID_ARGUMENT, str(e)) from None
        finally:
            path.unlink()

    async def shutdown(self) -> None:
        """Kills and deletes every container."""
        for container in list(self.containers.values()):
            await self._end(container)

    async def end(self, container_id: str) -> None:
        """Kills and deletes the container, if it is still there."""
        container = self.containers.get(container_id)
        if container is not None:
            await self._end(container)

    async def _end(self, container: Container) -> None:
        # One whose processes have all ended needs no `crun delete`: its state and its
        # empty cgroup end with the VM.
        if container.init.exited.is_set() and not processes_left(container):
            self._forget(container)
            return
        if container.init.pid and not container.init.exited.is_set():
            with contextlib.suppress(OSError):
                os.kill(container.init.pid, signal.SIGKILL)
        await self._remove(container, force=True)

    # Events

    async def events(self) -> AsyncIterator[pb.Event]:
        queue: asyncio.Queue[pb.Event] = asyncio.Queue(maxsize=1024)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    def _publish(self, event: pb.Event) -> None:
        for queue in self._subscribers:
            if queue.full():
                log.warning("an events reader is not keeping up; dropped an event")
            else:
                queue.put_nowait(event)

    def _check_oom(self, container: Container) -> None:
        if container.cgroup is None:
            return
        try:
            count = stats.flat_keyed((container.cgroup / "memory.events").read_text()).get("oom_kill", 0)
        except OSError:
            return
        if count > container.oom_kills:
            container.oom_kills = count
            log.info("container %s: the OOM killer ended a process", container.id)
            self._publish(pb.Event(oom=pb.OomEvent(container_id=container.id)))

    def _ensure_oom_watch(self) -> None:
        if self._oom_task is None or self._oom_task.done():
            self._oom_task = asyncio.ensure_future(self._watch_oom())

    async def _watch_oom(self) -> None:
        while self.containers:
            for container in list(self.containers.values()):
                self._check_oom(container)
            await asyncio.sleep(0.5)
