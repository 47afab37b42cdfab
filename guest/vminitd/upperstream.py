"""The writable layer as a stream for the host (spinbox.api.upper_format).

Walks an overlay upper directory and yields the stream in pieces: every
directory, regular file (holes skipped), symlink, hard link, whiteout, FIFO
and socket with its mode, owner, times and extended attributes. A device
node other than a whiteout has no place in a layer spinbox writes back: it
fails the export with a sentence naming it, rather than being left out.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from spinbox.api import upper_format as wire

# The stream is handed out in pieces of about this size.
PIECE = 1 << 20


class ExportError(Exception):
    """The upper directory holds something that cannot be written back."""


def _record(kind: wire.RecordType, payload: bytes) -> bytes:
    return wire.RECORD_HEAD.pack(kind, len(payload)) + payload


def _entry(
    kind: wire.Kind, st: os.stat_result, path: bytes, target: bytes, xattrs: list[tuple[bytes, bytes]]
) -> bytes:
    size = st.st_size if kind is wire.Kind.REGULAR else 0
    parts = [
        wire.ENTRY_HEAD.pack(
            kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns, size
        ),
        wire.U16.pack(len(path)),
        path,
        wire.U16.pack(len(target)),
        target,
        wire.U16.pack(len(xattrs)),
    ]
    for name, value in xattrs:
        parts += [wire.U8.pack(len(name)), name, wire.U32.pack(len(value)), value]
    return _record(wire.RecordType.ENTRY, b"".join(parts))


def _xattrs(path: bytes) -> list[tuple[bytes, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise
    return [
        (name.encode(), os.getxattr(path, name, follow_symlinks=False))
        for name in sorted(names)
        if name not in wire.GUEST_ONLY_XATTRS
    ]


def _kind(st: os.stat_result, shown: bytes) -> wire.Kind:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return wire.Kind.DIRECTORY
    if stat.S_ISREG(mode):
        return wire.Kind.REGULAR
    if stat.S_ISLNK(mode):
        return wire.Kind.SYMLINK
    if stat.S_ISCHR(mode) and st.st_rdev == 0:
        return wire.Kind.WHITEOUT
    if stat.S_ISFIFO(mode):
        return wire.Kind.FIFO
    if stat.S_ISSOCK(mode):
        return wire.Kind.SOCKET
    what = "character" if stat.S_ISCHR(mode) else "block" if stat.S_ISBLK(mode) else "special"
    name = shown.decode(errors="replace")
    raise ExportError(f"/{name} is a {what} device node, which spinbox does not write back to the host")


def _content(path: bytes, size: int) -> Iterator[bytes]:
    """DATA records for a regular file's content, its holes left out."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        offset = 0
        while offset < size:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
                end = min(os.lseek(fd, offset, os.SEEK_HOLE), size)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return  # nothing but a hole up to the end
                raise
            while offset < end:
                data = os.pread(fd, min(wire.DATA_CHUNK, end - offset), offset)
                if not data:
                    return  # the file shrank under us; END's sum still names its recorded size
                yield _record(wire.RecordType.DATA, wire.DATA_HEAD.pack(offset) + data)
                offset += len(data)
    finally:
        os.close(fd)


def records(upper: str | os.PathLike[str]) -> Iterator[bytes]:
    """The stream's records for the upper directory `upper`, in order."""
    root = os.fsencode(upper)
    yield wire.MAGIC + wire.U8.pack(wire.VERSION)
    linked: dict[tuple[int, int], bytes] = {}
    count = total = 0
    pending: list[bytes] = [b""]
    while pending:
        relative = pending.pop()
        full = os.path.join(root, relative) if relative else root
        st = os.lstat(full)
        kind = _kind(st, relative)
        target = b""
        if kind is wire.Kind.SYMLINK:
            target = os.readlink(full)
        elif kind is wire.Kind.REGULAR and st.st_nlink > 1:
            first = linked.get((st.st_dev, st.st_ino))
            if first is None:
                linked[(st.st_dev, st.st_ino)] = relative
            else:
                kind, target = wire.Kind.HARDLINK, first
        yield _entry(kind, st, relative, target, _xattrs(full) if kind is not wire.Kind.HARDLINK else [])
        count += 1
        if kind is wire.Kind.REGULAR:
            total += st.st_size
            yield from _content(full, st.st_size)
        elif kind is wire.Kind.DIRECTORY:
            names = sorted(os.listdir(full), reverse=True)
            pending += [os.path.join(relative, name) if relative else name for name in names]
    yield _record(wire.RecordType.END, wire.END_BODY.pack(count, total))


def pieces(upper: str | os.PathLike[str]) -> Iterator[bytes]:
    """The stream in pieces of about PIECE bytes (blocking: step it in a thread)."""
    buffer: list[bytes] = []
    size = 0
    try:
        for record in records(upper):
            buffer.append(record)
            size += len(record)
            if size >= PIECE:
                yield b"".join(buffer)
                buffer, size = [], 0
    except OSError as e:
        raise ExportError(f"reading the writable layer failed: {e.strerror or e} ({e.filename})") from e
    if buffer:
        yield b"".join(buffer)
