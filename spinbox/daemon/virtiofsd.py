"""A VM's virtiofsd: started with QEMU in the VM's scope, serving the VM's share.

spinboxd creates the vhost-user connection itself: virtiofsd gets the
listening socket (--fd), QEMU the connected end, and QEMU starts once
virtiofsd has accepted that connection (within timeouts.virtiofsd_start).
A confined VM's virtiofsd runs as a uid of its own in a user namespace of its
own (spinbox.daemon.fsuser).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import subprocess
from pathlib import Path
from types import TracebackType

from spinbox.daemon import share
from spinbox.daemon.errors import Failed
from spinbox.daemon.fsuser import CONFINABLE, SHARE, FsUser
from spinbox.daemon.options import VmRequest
from spinbox.daemon.spawn import ScopeSpawner

POLL_INTERVAL = 0.05


class VirtiofsConnection(contextlib.AbstractContextManager["VirtiofsConnection"]):
    """spinboxd's copy of virtiofsd's listening socket, and QEMU's connected end."""

    def __init__(self, listener: socket.socket, client: socket.socket, timeout: float) -> None:
        self.listener = listener
        self.client = client
        self.timeout = timeout

    @property
    def qemu_fd(self) -> int:
        return self.client.fileno()

    async def accepted(self, process: subprocess.Popen[bytes]) -> None:
        """Return once virtiofsd has accepted QEMU's queued connection: the listening socket
        is readable while it waits in the backlog."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        while poller.poll(0):
            status = process.poll()
            if status is not None:
                raise Failed(
                    f"the VM's virtiofsd ended (status {status}) before it took QEMU's connection; "
                    "its messages are in the VM's journal"
                )
            if loop.time() > deadline:
                raise Failed(
                    f"the VM's virtiofsd did not take QEMU's connection within {self.timeout:g} s "
                    "(timeouts.virtiofsd_start)"
                )
            await asyncio.sleep(POLL_INTERVAL)

    def close(self) -> None:
        self.listener.close()
        self.client.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def start_share(
    request: VmRequest,
    runtime_dir: Path,
    spawner: ScopeSpawner,
    start_timeout: float,
    uid_base: int | None,
) -> VirtiofsConnection:
    """The VM's share with the container's volumes, and its virtiofsd (a companion of QEMU in
    the scope): confined as a uid of its own from `uid_base` on, or root's with None
    (vm.confine = false); the caller closes the returned connection once QEMU has its end."""
    virtiofsd = share.find_virtiofsd()
    if virtiofsd is None:
        raise Failed(
            "the container has bind mounts, which need virtiofsd: install qemu-system-common "
            "(Debian 12) or virtiofsd"
        )
    directory = share.share_dir(runtime_dir)
    await asyncio.to_thread(share.prepare, directory)
    if request.volumes:
        await asyncio.to_thread(share.bind, directory, request.container_id, list(request.volumes))
    listener, client = share.vhost_user_sockets(runtime_dir)
    connection = VirtiofsConnection(listener, client, start_timeout)
    fd = os.dup(listener.fileno())  # virtiofsd's; the spawner closes it once virtiofsd has it
    if uid_base is None or virtiofsd != CONFINABLE:
        spawner.add_companion(share.virtiofsd_argv(virtiofsd, directory, fd), (fd,), connection.accepted)
        return connection
    user: FsUser | None = None
    try:
        user = FsUser.allocate(uid_base)
        root = share.root_dir(runtime_dir)
        root.mkdir(mode=0o700)
    except BaseException:
        for owned in (fd, -1 if user is None else user.lease_fd):
            with contextlib.suppress(OSError):
                os.close(owned)
        connection.close()
        raise
    argv = user.wrap(share.virtiofsd_argv(virtiofsd, SHARE, fd, sandbox="chroot"), root, directory)

    async def map_ids(process: subprocess.Popen[bytes]) -> None:
        await user.map_ids(process, start_timeout)

    # The uid's lease goes with virtiofsd: free again exactly when it ends.
    spawner.add_companion(
        argv, (fd, user.lease_fd), connection.accepted, prefix=user.prefix(), started=map_ids
    )
    return connection
