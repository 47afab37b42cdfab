"""ttrpc framing: a 10-byte header (big-endian uint32 length, uint32 stream
id, uint8 type, uint8 flags) followed by `length` bytes of payload.

FrameReader turns a byte stream into frames and is the only place that trusts
nothing: every way a peer can break the framing ends in ProtocolError (the
connection must be closed) or, for a well-formed frame that is merely too
large, an OversizedFrame that has already been skipped. It never holds more
than one message of at most `max_message` bytes.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from typing import NamedTuple

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size
MAX_MESSAGE = 4 << 20
# The first length byte is reserved and always zero, so no valid frame is
# 16 MiB or larger: such a length is garbage, not a message to skip.
MAX_SKIPPABLE = 1 << 24
_SKIP_CHUNK = 64 << 10


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    NONE = 0
    # On a request or data frame: the sender sends nothing more on this stream.
    REMOTE_CLOSED = 0x1
    # On a request: a streaming call whose sender keeps sending data frames.
    REMOTE_OPEN = 0x2
    # On a data frame: there is no message in this frame (a bare close).
    NO_DATA = 0x4


class ProtocolError(Exception):
    """The peer broke the framing; the connection cannot continue."""


# Records are NamedTuples, not dataclasses: a dataclass costs about four
# times as much to define, and the guest agent's boot imports this module.
class Frame(NamedTuple):
    stream_id: int
    type: FrameType
    flags: int
    payload: bytes


class OversizedFrame(NamedTuple):
    """A frame larger than the message cap, read past and dropped."""

    stream_id: int
    type: FrameType
    flags: int
    length: int


def encode_header(stream_id: int, frame_type: int, flags: int, length: int) -> bytes:
    return HEADER.pack(length, stream_id, frame_type, flags)


def encode_frame(stream_id: int, frame_type: int, flags: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), stream_id, frame_type, flags) + payload


class FrameReader:
    """Reads frames from an asyncio StreamReader."""

    def __init__(self, reader: asyncio.StreamReader, max_message: int = MAX_MESSAGE) -> None:
        self._reader = reader
        self._max_message = max_message

    async def read(self) -> Frame | OversizedFrame | None:
        """The next frame, or None at a clean end of stream (between frames)."""
        try:
            header = await self._reader.readexactly(HEADER_SIZE)
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return None
            raise ProtocolError(
                f"stream ended inside a frame header ({len(e.partial)} of 10 bytes)"
            ) from None
        length, stream_id, raw_type, flags = HEADER.unpack(header)
        try:
            frame_type = FrameType(raw_type)
        except ValueError:
            raise ProtocolError(f"unknown frame type {raw_type} on stream {stream_id}") from None
        if length > self._max_message:
            if length >= MAX_SKIPPABLE:
                raise ProtocolError(f"frame length {length} on stream {stream_id} is not a valid length")
            await self._skip(length, stream_id)
            return OversizedFrame(stream_id, frame_type, flags, length)
        try:
            payload = await self._reader.readexactly(length) if length else b""
        except asyncio.IncompleteReadError as e:
            raise ProtocolError(
                f"stream ended inside a frame on stream {stream_id} ({len(e.partial)} of {length} bytes)"
            ) from None
        return Frame(stream_id, frame_type, flags, payload)

    async def _skip(self, length: int, stream_id: int) -> None:
        left = length
        while left:
            chunk = await self._reader.read(min(left, _SKIP_CHUNK))
            if not chunk:
                raise ProtocolError(f"stream ended inside an oversized frame on stream {stream_id}")
            left -= len(chunk)
