"""`delete`: containerd's cleanup after a shim died. Removes the VM (through
spinboxd) and the shim's files, and prints a DeleteResponse on stdout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from spinbox.shim.options import ShimOptions


async def _remove_vm(namespace: str, container_id: str) -> None:
    from spinbox.shim.spinboxd import Spinboxd, SpinboxdError, vm_id_for

    try:
        spinboxd = await Spinboxd.connect()
    except SpinboxdError as error:
        print(f"containerd-shim-spinbox-v1: {error.message}", file=sys.stderr)
        return
    try:
        await spinboxd.stop_vm(vm_id_for(namespace, container_id), 0, kill=True)
    finally:
        spinboxd.close()


def delete(options: ShimOptions) -> int:
    from spinbox.shim.bootstrap import group_id, read_annotations, socket_path
    from spinbox.shim.events import timestamp
    from spinbox.shim.protos import task

    bundle = Path(options.bundle or os.getcwd())
    annotations = read_annotations(bundle)
    try:
        asyncio.run(_remove_vm(options.namespace, options.id))
    except Exception as error:
        print(
            f"containerd-shim-spinbox-v1: could not remove the VM of {options.id}: {error}", file=sys.stderr
        )
        return 1
    group = group_id(options.id, annotations)
    if group == options.id:
        with contextlib.suppress(FileNotFoundError):
            socket_path(options.address, options.namespace, group).unlink()
    with contextlib.suppress(FileNotFoundError):
        (bundle / "address").unlink()
    response = task.DeleteResponse(pid=0, exit_status=128 + signal.SIGKILL, exited_at=timestamp())
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.flush()
    return 0
