"""A process's exit and a container's OOM kills, as containerd learns them: the
guest's (vminitd watches the container's memory.events) and the VM's own (the
host kernel's OOM killer ended QEMU, mostly at its scope's memory limit, which
spinboxd's VMEndingCause says; TaskOOM then comes before the exit).

The exit path is written once, in `watch_exit`, and ordered: reap (the
agent's Wait), drain the output, record the exit, and only then publish
TaskExit, so everything a process wrote reaches containerd before its exit.
The drain has a deadline: a process the exited one started (and that outlived
it) may hold its stdout open for ever, and the exit is never held back by it."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from spinbox.shim import events as topics
from spinbox.shim.container import Container, ProcessState, Publisher
from spinbox.shim.protos import events

log = logging.getLogger(__name__)

# The exit status of a process whose VM was removed (128 + SIGKILL).
KILLED = 128 + 9
# The exit status of a process lost with its VM when spinboxd cannot say how the VM ended.
UNKNOWN = 255
# How long spinboxd may take to see the end of a VM whose agent went silent.
VM_ENDING_WAIT = 10.0
# spinboxd's cause of a VM whose QEMU the kernel's OOM killer ended (at its scope's memory limit,
# or with the host out of memory).
OOM_KILL = "oom-kill"
# How long output still in the pipes may take to reach containerd after its process exited.
DRAIN_WAIT = 5.0


def now() -> datetime:
    return datetime.now(UTC)


def stamp(at: datetime | None) -> Any:
    """A protobuf timestamp; the epoch for a process that has not exited."""
    return topics.timestamp(at) if at is not None else topics.timestamp(datetime.fromtimestamp(0, UTC))


def watch(container: Container, state: ProcessState, publisher: Publisher) -> None:
    """Starts the process's exit watch, once."""
    if state.watcher is None:
        state.watcher = asyncio.get_running_loop().create_task(watch_exit(container, state, publisher))


async def watch_exit(container: Container, state: ProcessState, publisher: Publisher) -> None:
    proc = state.process
    try:
        result = await container.agent.wait(proc.container_id, proc.exec_id)
        status = result.exit_status
        at = result.exited_at.ToDatetime(UTC) if result.HasField("exited_at") else now()
    except asyncio.CancelledError:
        raise
    except Exception as error:
        # The guest went away: the status says how its VM ended, as spinboxd's journal does.
        status, reason, cause = await vm_ended(container)
        log.error(
            "lost %s with VM %s (%s): %s; exit status %d", proc.name, container.vm_id, error, reason, status
        )
        at = now()
        if cause == OOM_KILL and not container.vm_oom_published:
            # The OOM killer ended the container with its VM: containerd learns it before any exit of it.
            container.vm_oom_published = True
            publisher.publish(topics.TASK_OOM, events.TaskOOM(container_id=container.id))
    # Everything the process wrote reaches containerd before its exit does.
    await drain(proc.name, state.outputs, DRAIN_WAIT)
    if state.stdin is not None and not state.stdin.done():
        state.stdin.cancel()
    if state.io is not None:
        await state.io.close()
    proc.exited(status, at)
    publisher.publish(
        topics.TASK_EXIT,
        events.TaskExit(
            container_id=proc.container_id,
            id=proc.exec_id or proc.container_id,
            pid=proc.pid,
            exit_status=status,
            exited_at=stamp(at),
        ),
    )


async def drain(name: str, outputs: list[asyncio.Task[None]], deadline: float) -> None:
    """Waits for the output copiers to reach their end of file, at most `deadline` seconds; the
    ones still open then (held by a process that outlived `name`) are cut, and named in the log."""
    if not outputs:
        return
    _, pending = await asyncio.wait(outputs, timeout=deadline)
    if not pending:
        return
    cut = sorted(task.get_name() for task in pending)
    log.warning(
        "%s exited, but its %s stayed open %g s later (a process it started still holds it): "
        "forwarding stopped there, and the exit is reported",
        name,
        " and ".join(cut),
        deadline,
    )
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def vm_ended(container: Container) -> tuple[int, str, str]:
    """The exit status of a process lost with the container's VM, the sentence saying why,
    and what ended the VM (spinboxd's word for it, "" when unknown)."""
    if container.vm_ending is None:
        return UNKNOWN, "spinboxd was not asked how the VM ended", ""
    try:
        return await container.vm_ending()
    except asyncio.CancelledError:
        raise
    except Exception as error:
        return UNKNOWN, f"spinboxd cannot say how the VM ended: {error}", ""


async def watch_oom(container: Container, publisher: Publisher) -> None:
    """Publishes TaskOOM for each OOM kill the guest reports, until its event stream ends."""
    try:
        async for event in container.agent.events():
            if event.HasField("oom"):
                publisher.publish(topics.TASK_OOM, events.TaskOOM(container_id=event.oom.container_id))
    except asyncio.CancelledError:
        raise
    except Exception as error:
        log.debug("event stream of %s ended: %s", container.id, error)
