"""The serving shim's word to the `delete` containerd runs after it (spinbox.shim.cleanup):
a file in the container's bundle, written once spinboxd holds nothing of the container
(its VM stopped and released, or its rootfs taken out of its pod's VM).

containerd runs `delete` after every shim's end, not only after a crash, and waits for
it. With the file there, `delete` need not ask spinboxd; without it (the shim died
first, or could not write it) `delete` removes the VM through spinboxd as always.
"""

from __future__ import annotations

import contextlib
import os

NAME = "spinbox-released"


def mark(bundle: str) -> None:
    """Records that nothing of the container is left; OSError if the file cannot be made."""
    fd = os.open(os.path.join(bundle, NAME), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    os.close(fd)


def marked(bundle: str) -> bool:
    """Whether the serving shim recorded that nothing of the container is left."""
    return os.path.isfile(os.path.join(bundle, NAME))


def clear(bundle: str) -> None:
    """Takes the record away: a container created again in the same bundle starts without it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(bundle, NAME))
