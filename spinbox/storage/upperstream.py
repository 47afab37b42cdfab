"""Writing a guest's writable layer into the snapshot: the stream of spinbox.api.upper_format, checked.

The stream comes from the guest, which is not trusted. The extractor writes
it into a new directory of its own beside the snapshot's upper directory and
refuses, with an UnsafeUpper naming the thing:
- a path that is absolute, empty, holds NUL, `.` or `..`, or whose parent is
  not a directory the stream itself created (so nothing is ever written
  through a symlink: every directory is opened with O_NOFOLLOW, every file
  created with O_EXCL relative to its directory's descriptor);
- a device node (the format has none but the whiteout) or an unknown kind;
- more bytes (regular files by their apparent size, holes included) or more
  entries than the caps, checked before anything of the entry is written;
- a malformed, cut short or overlong stream, an extended attribute outside
  the user, trusted, security and ACL name spaces.
Modes (setuid included) are set as the guest had them, after the owner.
Only a complete, checked stream replaces the snapshot's upper directory
(one atomic exchange); a refused one leaves the snapshot as it was.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import stat
import struct
import uuid
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from spinbox.api.upper_format import (
    DATA_HEAD,
    END_BODY,
    ENTRY_HEAD,
    GUEST_ONLY_XATTRS,
    MAGIC,
    MAX_NAME,
    MAX_PATH,
    MAX_RECORD,
    MAX_XATTR_NAME,
    MAX_XATTR_VALUE,
    MAX_XATTRS,
    RECORD_HEAD,
    U8,
    U16,
    U32,
    VERSION,
    Kind,
    RecordType,
)
from spinbox.storage.errors import SnapshotGone, StorageError
from spinbox.storage.system import os_error

log = logging.getLogger(__name__)

XATTR_PREFIXES = ("user.", "trusted.", "security.")
XATTR_NAMES = ("system.posix_acl_access", "system.posix_acl_default")
DEFAULT_MAX_ENTRIES = 4_000_000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_EXCHANGE = 2
T = TypeVar("T")
_AT_FDCWD = -100


class UnsafeUpper(StorageError):
    """The guest's writable layer was refused; nothing of it was written into the snapshot."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_entries: int = DEFAULT_MAX_ENTRIES


@dataclass
class _Entry:
    kind: Kind
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    size: int
    path: bytes
    target: bytes
    xattrs: list[tuple[str, bytes]]


class _Cursor:
    def __init__(self, data: memoryview, fail: type[UnsafeUpper], what: str) -> None:
        self.data, self.at, self.fail, self.what = data, 0, fail, what

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise self.fail(f"{self.what}: an entry record is cut short")
        piece = bytes(self.data[self.at : self.at + size])
        self.at += size
        return piece

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        return layout.unpack(self.take(layout.size))


class Extractor:
    """Writes one stream into `dest`, a directory it creates; blocking (feed it from a thread).

    `what` names the layer in errors ("the writable layer of container X"), `replaces`
    the directory it is to replace."""

    def __init__(self, dest: Path, limits: Limits, what: str, replaces: Path | None = None) -> None:
        self.dest = dest
        self.replaces = replaces or dest
        self.limits = limits
        self.what = what
        self._buffer = bytearray()
        self._started = False
        self._ended = False
        self._entries = 0
        self._bytes = 0
        self._dirs: set[bytes] = {b""}
        self._dir_times: list[tuple[bytes, int, int]] = []
        self._parent: tuple[bytes, int] | None = None
        self._file: tuple[int, _Entry] | None = None
        self._file_end = 0
        os.mkdir(dest, 0o700)
        self._root = os.open(dest, _DIR_FLAGS)

    # -- input --------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._buffer += data
        view = memoryview(self._buffer)
        at = 0
        try:
            if not self._started:
                head = len(MAGIC) + U8.size
                if len(view) < head:
                    return
                if bytes(view[: len(MAGIC)]) != MAGIC:
                    raise UnsafeUpper(f"{self.what} did not arrive in spinbox's format")
                if view[len(MAGIC)] != VERSION:
                    raise UnsafeUpper(
                        f"{self.what} arrived in format version {view[len(MAGIC)]}, not {VERSION}"
                    )
                self._started, at = True, head
            while len(view) - at >= RECORD_HEAD.size:
                kind, length = RECORD_HEAD.unpack_from(view, at)
                if length > MAX_RECORD:
                    raise UnsafeUpper(f"{self.what} holds a record of {length} bytes, over the limit")
                if self._ended:
                    raise UnsafeUpper(f"{self.what} goes on after its end")
                if len(view) - at - RECORD_HEAD.size < length:
                    break
                start = at + RECORD_HEAD.size
                self._record(kind, view[start : start + length])
                at = start + length
        finally:
            view.release()
        del self._buffer[:at]

    def finish(self) -> None:
        """Check the stream was whole and give directories their times; the tree is then complete."""
        if not self._ended or self._buffer:
            raise UnsafeUpper(f"{self.what} was cut short")
        for path, atime, mtime in reversed(self._dir_times):
            fd = self._open_dir(path)
            try:
                os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file[0])
            self._file = None
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    # -- records ------------------------------------------------------------

    def _record(self, kind: int, payload: memoryview) -> None:
        if kind == RecordType.DATA:
            self._data(payload)
            return
        self._close_file()
        if kind == RecordType.ENTRY:
            self._entry(self._parse_entry(payload))
        elif kind == RecordType.END:
            if len(payload) != END_BODY.size:
                raise UnsafeUpper(f"{self.what}: its end record is malformed")
            entries, total = END_BODY.unpack(payload)
            if (entries, total) != (self._entries, self._bytes):
                raise UnsafeUpper(
                    f"{self.what} announced {entries} entries of {total} bytes "
                    f"but sent {self._entries} of {self._bytes}"
                )
            self._ended = True
        else:
            raise UnsafeUpper(f"{self.what} holds a record of unknown type {kind}")

    def _parse_entry(self, payload: memoryview) -> _Entry:
        cursor = _Cursor(payload, UnsafeUpper, self.what)
        kind, mode, uid, gid, atime, mtime, size = cursor.unpack(ENTRY_HEAD)
        path = cursor.take(cursor.unpack(U16)[0])
        target = cursor.take(cursor.unpack(U16)[0])
        xattrs = []
        (count,) = cursor.unpack(U16)
        if count > MAX_XATTRS:
            raise UnsafeUpper(f"{self.what}: {_show(path)} has {count} extended attributes, over the limit")
        for _ in range(count):
            name = cursor.take(cursor.unpack(U8)[0])
            (length,) = cursor.unpack(U32)
            if length > MAX_XATTR_VALUE:
                raise UnsafeUpper(f"{self.what}: {_show(path)} has an extended attribute over the limit")
            xattrs.append((self._xattr_name(name, path), cursor.take(length)))
        if cursor.at != len(payload):
            raise UnsafeUpper(f"{self.what}: the entry record of {_show(path)} is malformed")
        try:
            entry_kind = Kind(kind)
        except ValueError:
            raise UnsafeUpper(
                f"{self.what}: {_show(path)} is of kind {kind}, which is not a file, directory, symlink,"
                " hard link, whiteout, FIFO or socket (device nodes are refused)"
            ) from None
        if mode & ~0o7777:
            raise UnsafeUpper(f"{self.what}: {_show(path)} has the invalid mode {mode:o}")
        return _Entry(entry_kind, mode, uid, gid, atime, mtime, size, path, target, xattrs)

    def _xattr_name(self, name: bytes, path: bytes) -> str:
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if (
            not text
            or len(name) > MAX_XATTR_NAME
            or "\0" in text
            or not (text.startswith(XATTR_PREFIXES) or text in XATTR_NAMES)
        ):
            raise UnsafeUpper(
                f"{self.what}: {_show(path)} has the extended attribute {name!r},"
                " outside the user, trusted, security and ACL name spaces"
            )
        return text

    def _check_path(self, path: bytes, role: str) -> tuple[bytes, bytes]:
        """(parent, name) of a path inside the layer, or an UnsafeUpper naming it."""
        parts = path.split(b"/")
        if (
            not path
            or len(path) > MAX_PATH
            or b"\0" in path
            or any(part in (b"", b".", b"..") or len(part) > MAX_NAME for part in parts)
        ):
            raise UnsafeUpper(f"{self.what} names {role} {path!r}, which escapes or is not a path")
        parent = b"/".join(parts[:-1])
        if parent not in self._dirs:
            raise UnsafeUpper(
                f"{self.what} puts {role} {_show(path)} in {_show(parent)}, which is not a directory"
                " it created before (writing through a symlink or out of order)"
            )
        return parent, parts[-1]

    def _entry(self, entry: _Entry) -> None:
        if not self._entries:
            if entry.path or entry.kind is not Kind.DIRECTORY:
                raise UnsafeUpper(f"{self.what} does not start with its top directory")
            self._entries = 1
            self._set_metadata(self._root, entry)
            self._dir_times.append((b"", entry.atime_ns, entry.mtime_ns))
            return
        self._entries += 1
        if self._entries > self.limits.max_entries:
            raise UnsafeUpper(f"{self.what} holds more than {self.limits.max_entries} entries, the cap")
        parent, name = self._check_path(entry.path, "the path")
        if entry.kind is Kind.REGULAR:
            self._bytes += entry.size
            if self._bytes > self.limits.max_bytes:
                raise UnsafeUpper(
                    f"{self.what} holds more than the cap of {self.limits.max_bytes} bytes"
                    f" at {_show(entry.path)} ({entry.size} bytes; sparse files count by their size)"
                )
        dir_fd = self._parent_fd(parent)
        try:
            self._create(dir_fd, name, entry)
        except FileExistsError:
            raise UnsafeUpper(f"{self.what} names {_show(entry.path)} twice") from None
        except OSError as e:
            raise self._failed(e, entry.path) from None

    def _create(self, dir_fd: int, name: bytes, entry: _Entry) -> None:
        kind = entry.kind
        if kind is Kind.DIRECTORY:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                self._set_metadata(fd, entry)
            finally:
                os.close(fd)
            self._dirs.add(entry.path)
            self._dir_times.append((entry.path, entry.atime_ns, entry.mtime_ns))
        elif kind is Kind.REGULAR:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
            self._file, self._file_end = (fd, entry), 0
            os.ftruncate(fd, entry.size)
        elif kind is Kind.HARDLINK:
            target_parent, target_name = self._check_path(entry.target, "the hard link target")
            target_fd = self._open_dir(target_parent)
            try:
                st = os.stat(target_name, dir_fd=target_fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafeUpper(
                        f"{self.what} links {_show(entry.path)} to {_show(entry.target)}, not a regular file"
                    )
                os.link(target_name, name, src_dir_fd=target_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise UnsafeUpper(
                    f"{self.what} links {_show(entry.path)} to {_show(entry.target)}, which it did not send"
                ) from None
            finally:
                os.close(target_fd)
        else:
            if kind is Kind.SYMLINK:
                if not entry.target or b"\0" in entry.target or len(entry.target) > MAX_PATH:
                    raise UnsafeUpper(f"{self.what}: the symlink {_show(entry.path)} has an invalid target")
                os.symlink(entry.target, name, dir_fd=dir_fd)
            elif kind is Kind.WHITEOUT:
                os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=dir_fd)
            elif kind is Kind.FIFO:
                os.mknod(name, stat.S_IFIFO | 0o600, dir_fd=dir_fd)
            else:
                os.mknod(name, stat.S_IFSOCK | 0o600, dir_fd=dir_fd)
            # The new name (not what it points to), through the directory's descriptor.
            self._set_metadata(f"/proc/self/fd/{dir_fd}/{os.fsdecode(name)}", entry)

    def _set_metadata(self, target: int | str, entry: _Entry) -> None:
        """Owner, then mode (chown clears setuid), attributes, times; never following a symlink."""
        link = entry.kind is Kind.SYMLINK
        os.chown(target, entry.uid, entry.gid, follow_symlinks=isinstance(target, int))
        if not link:
            os.chmod(target, entry.mode)
        for name, value in entry.xattrs:
            if name not in GUEST_ONLY_XATTRS:
                os.setxattr(target, name, value, follow_symlinks=isinstance(target, int))
        if entry.kind is not Kind.DIRECTORY:
            os.utime(target, ns=(entry.atime_ns, entry.mtime_ns), follow_symlinks=isinstance(target, int))

    def _data(self, payload: memoryview) -> None:
        if self._file is None:
            raise UnsafeUpper(f"{self.what} sends file content that follows no regular file")
        fd, entry = self._file
        if len(payload) < DATA_HEAD.size:
            raise UnsafeUpper(f"{self.what}: a content record of {_show(entry.path)} is malformed")
        (offset,) = DATA_HEAD.unpack_from(payload)
        data = payload[DATA_HEAD.size :]
        if offset < self._file_end or offset + len(data) > entry.size:
            raise UnsafeUpper(
                f"{self.what} sends content of {_show(entry.path)} out of order or beyond its size"
            )
        try:
            while data:
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
        except OSError as e:
            raise self._failed(e, entry.path) from None
        self._file_end = offset

    def _close_file(self) -> None:
        if self._file is None:
            return
        fd, entry = self._file
        self._file = None
        try:
            self._set_metadata(fd, entry)
        except OSError as e:
            raise self._failed(e, entry.path) from None
        finally:
            os.close(fd)

    def _failed(self, error: OSError, path: bytes) -> StorageError:
        """A full disk is the host's trouble; anything else the guest's stream caused."""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return os_error(error, f"writing {self.what}", self.replaces)
        return UnsafeUpper(f"{self.what}: writing {_show(path)} failed: {error.strerror}")

    # -- directories, always opened without following a link ---------------

    def _open_dir(self, path: bytes) -> int:
        fd = os.dup(self._root)
        try:
            for part in path.split(b"/") if path else []:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _parent_fd(self, parent: bytes) -> int:
        if self._parent is not None and self._parent[0] == parent:
            return self._parent[1]
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None
        fd = self._open_dir(parent)
        self._parent = (parent, fd)
        return fd


def _show(path: bytes) -> str:
    return "/" + path.decode(errors="backslashreplace")


def _exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), str(a), None, str(b))


async def _blocking(function: Callable[..., T], *args: Any) -> T:
    """Run blocking work in a thread; a cancelled caller still waits for it to end."""
    task = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        try:
            await task
        except Exception as error:  # the cancellation goes on; what the work met is said
            log.warning("%s, cancelled, also failed: %s", getattr(function, "__name__", function), error)
        raise


async def receive(chunks: AsyncIterable[bytes], snapshot_upper: Path, limits: Limits, what: str) -> None:
    """Make `snapshot_upper` exactly the layer the stream carries, or leave it as it was.

    The stream is written into a new sibling directory, checked to its end,
    then exchanged with the snapshot's upper directory in one step. SnapshotGone
    when containerd removed the snapshot (its container deleted) before the
    layer was in place."""
    try:
        await _receive(chunks, snapshot_upper, limits, what)
    except StorageError:
        if not snapshot_upper.parent.exists():
            raise _gone(snapshot_upper, what) from None
        raise
    if not snapshot_upper.parent.exists():
        # Written through directory fds into a snapshot removed meanwhile: it went with it.
        raise _gone(snapshot_upper, what)


def _gone(snapshot_upper: Path, what: str) -> SnapshotGone:
    return SnapshotGone(
        f"{what} was not written back: its snapshot {snapshot_upper.parent} was removed "
        "(the container was deleted) before the layer was in place"
    )


async def _receive(chunks: AsyncIterable[bytes], snapshot_upper: Path, limits: Limits, what: str) -> None:
    staging = snapshot_upper.with_name(f".spinbox-upper.{uuid.uuid4().hex[:12]}")
    try:
        extractor = await _blocking(Extractor, staging, limits, what, snapshot_upper)
    except OSError as e:
        raise StorageError(f"writing {what} into {snapshot_upper} failed: {e.strerror} ({staging})") from None
    try:
        try:
            async for chunk in chunks:
                await _blocking(extractor.feed, chunk)
            await _blocking(extractor.finish)
        finally:
            extractor.close()
            # A refused stream is abandoned at once: the guest stops sending it.
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()
        await _blocking(_exchange, staging, snapshot_upper)
    except OSError as e:
        raise StorageError(
            f"writing {what} into {snapshot_upper} failed: {e.strerror} ({e.filename})"
        ) from None
    finally:
        # After the exchange this is the old upper directory. rmtree never follows symlinks.
        await _blocking(shutil.rmtree, staging, True)
