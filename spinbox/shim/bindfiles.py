"""Host files of a container's bind mounts, read to be copied into the VM
(the host's file systems are not shared with the guest)."""

from __future__ import annotations

import os
import stat

from spinbox.api.proto import agent_pb2

# Host files up to this size are copied into the guest for a bind mount
# (/etc/hosts, /etc/resolv.conf and the like are far smaller).
BIND_FILE_LIMIT = 1 << 20
# All of a container's bind files together, so CreateContainer stays well
# within a ttrpc message (4 MiB).
BIND_FILES_TOTAL = 2 << 20


def read_bind_file(source: str) -> agent_pb2.BindFile | str:
    """A host file for a bind mount (content, permissions, owner), or why it cannot be copied in."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        return f"cannot open it: {error.strerror}"
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            return "directories are not shared into the VM"
        if not stat.S_ISREG(info.st_mode):
            return "it is not a regular file"
        if info.st_size > BIND_FILE_LIMIT:
            return f"it is larger than {BIND_FILE_LIMIT} bytes"
        chunks: list[bytes] = []
        size = 0
        while size <= BIND_FILE_LIMIT and (chunk := os.read(fd, BIND_FILE_LIMIT + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        return f"cannot read it: {error.strerror}"
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > BIND_FILE_LIMIT:
        return f"it is larger than {BIND_FILE_LIMIT} bytes"
    return agent_pb2.BindFile(content=data, mode=stat.S_IMODE(info.st_mode), uid=info.st_uid, gid=info.st_gid)
