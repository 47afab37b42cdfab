"""`delete`: containerd's cleanup after a shim ended. Removes the shim's files and,
unless the shim recorded that nothing of the container is left (spinbox.shim.released),
the VM (through spinboxd); prints a DeleteResponse on stdout.

containerd runs it after every shim's end and waits for it: when the shim ended in
order it does no more than remove two files and answer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from spinbox.shim import released
from spinbox.shim.options import ShimOptions


async def _remove_vm(namespace: str, container_id: str) -> bool:
    """Kills and removes the VM; False if it is still there afterwards."""
    from spinbox.busclient import SpinboxdError
    from spinbox.shim.spinboxd import Spinboxd, vm_id_for

    vm_id = vm_id_for(namespace, container_id)
    try:
        spinboxd = await Spinboxd.connect()
    except SpinboxdError as error:
        # No bus, so no spinboxd and no VM.
        _warn(error.message)
        return True
    try:
        await spinboxd.stop_vm(vm_id, 0, kill=True)
    except SpinboxdError as error:
        _warn(f"removing VM {vm_id}: {error.message}")
        return await spinboxd.get_vm(vm_id) is None
    finally:
        spinboxd.close()
    return True


def _warn(message: str) -> None:
    print(f"containerd-shim-spinbox-v1: {message}", file=sys.stderr)


def delete(options: ShimOptions) -> int:
    from google.protobuf.timestamp_pb2 import Timestamp

    from spinbox.shim.bootstrap import group_id, read_annotations, socket_path
    from spinbox.shim.protos import task

    bundle = Path(options.bundle or os.getcwd())
    group = group_id(options.id, read_annotations(bundle))
    # The shim's own files go first: they must not outlive it whatever happens to the VM.
    if group == options.id:
        with contextlib.suppress(FileNotFoundError):
            socket_path(options.address, options.namespace, group).unlink()
    with contextlib.suppress(FileNotFoundError):
        (bundle / "address").unlink()
    if released.marked(str(bundle)):
        # containerd removes the bundle next; a Create in it clears the record too.
        with contextlib.suppress(OSError):
            released.clear(str(bundle))
    else:
        import asyncio

        try:
            removed = asyncio.run(_remove_vm(options.namespace, options.id))
        except Exception as error:
            _warn(f"could not remove the VM of {options.id}: {error}")
            return 1
        if not removed:
            return 1
    exited_at = Timestamp()
    exited_at.GetCurrentTime()
    response = task.DeleteResponse(pid=0, exit_status=128 + signal.SIGKILL, exited_at=exited_at)
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.flush()
    return 0
