"""The wire format of a writable layer leaving the guest (agent rpc ExportUpper).

vminitd writes the overlay upper directory as a byte stream, spinboxd reads
it back (spinbox.storage.upperstream) and never trusts it. The stream is the
magic, a version byte, then records; each record is a type byte and a
big-endian uint32 payload length, then the payload:

- ENTRY: one file system object. ENTRY_HEAD (kind, mode, uid, gid, atime ns,
  mtime ns, size), then the path relative to the upper directory ('/'
  separated, empty for the directory itself, which comes first), then the
  target (a symlink's target; a hard link's earlier path), each a uint16
  length and bytes, then a uint16 count of extended attributes, each a uint8
  name length, the name, a uint32 value length and the value.
- DATA: a piece of the last REGULAR entry's content: a uint64 offset and the
  bytes. Holes of sparse files are simply not sent.
- END: the uint64 count of entries and the uint64 sum of regular files'
  sizes; a stream without it was cut short.

Directories come before what they hold. The ext4 and overlay meanings are
kept: a whiteout is a WHITEOUT entry (a 0/0 character device in overlayfs),
an opaque directory carries its trusted.overlay.opaque (or user.overlay.opaque)
attribute.
"""

from __future__ import annotations

import enum
import struct

MAGIC = b"SBUP"
VERSION = 1

RECORD_HEAD = struct.Struct(">BI")  # record type, payload length
ENTRY_HEAD = struct.Struct(">BIIIqqQ")  # kind, mode, uid, gid, atime_ns, mtime_ns, size
DATA_HEAD = struct.Struct(">Q")  # offset
END_BODY = struct.Struct(">QQ")  # entries, bytes
U8 = struct.Struct(">B")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

# A DATA record carries at most this much content; any record at most MAX_RECORD bytes.
DATA_CHUNK = 1 << 20
MAX_RECORD = 2 << 20
MAX_PATH = 4096
MAX_NAME = 255
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 65536
MAX_XATTRS = 128


# Overlay bookkeeping that refers to the guest's own file systems (file handles,
# copy-up state) and means nothing in the host's snapshot: never carried.
GUEST_ONLY_XATTRS = frozenset(
    f"{prefix}.overlay.{name}"
    for prefix in ("trusted", "user")
    for name in ("origin", "impure", "nlink", "upper", "uuid")
)


class RecordType(enum.IntEnum):
    ENTRY = 1
    DATA = 2
    END = 3


class Kind(enum.IntEnum):
    DIRECTORY = 1
    REGULAR = 2
    SYMLINK = 3
    HARDLINK = 4  # another name of an earlier REGULAR entry (the target)
    WHITEOUT = 5  # overlayfs's 0/0 character device
    FIFO = 6
    SOCKET = 7
