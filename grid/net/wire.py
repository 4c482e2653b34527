"""Frames on the wire, sans-IO: bytes in, frames out; frames in, bytes out.

A frame is a fixed header followed by its payload::

    +-------+---------+------+-------+-----+------------+---------+
    | magic | version | kind | flags | pad | request id | length  |
    | 2s    | B       | B    | B     | x   | Q          | I       |
    +-------+---------+------+-------+-----+------------+---------+

This module imports no socket, thread or clock: the decoder is fed bytes and
returns frames, so it can be tested one byte at a time. The length is checked
against the limit before any of the payload is buffered.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from ..errors import ProtocolError

MAGIC = b"GR"
VERSION = 1
HEADER = struct.Struct("!2sBBBxQI")
HEADER_SIZE = HEADER.size
HANDSHAKE_LIMIT = 4096
DEFAULT_MAX_PAYLOAD = 512 * 1024 * 1024
LARGE_FRAME = 64 * 1024  # payloads this big are received in place, not through the stream buffer
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


class Kind(enum.IntEnum):
    """Every frame kind there is; a frame of any other kind is refused."""

    # Handshake: small fixed-format (raw bytes + JSON) messages, capped at HANDSHAKE_LIMIT.
    HELLO = 1
    CHALLENGE = 2
    PROOF = 3
    WELCOME = 4
    REFUSE = 5
    # After authentication only.
    MESSAGE = 16  # one-way message
    REQUEST = 17  # expects exactly one RESPONSE with the same request id
    RESPONSE = 18


HANDSHAKE_KINDS = frozenset({Kind.HELLO, Kind.CHALLENGE, Kind.PROOF, Kind.WELCOME, Kind.REFUSE})
_KNOWN_KINDS = frozenset(int(kind) for kind in Kind)


class Flag(enum.IntFlag):
    NONE = 0
    MULTIPART = 1  # payload is a part table followed by the parts (out-of-band buffers)
    ERROR = 2  # a RESPONSE that carries an error instead of a result


class Frame(NamedTuple):
    kind: Kind
    flags: int
    request_id: int
    payload: bytes | memoryview


def encode_frame(kind: Kind, payload=b"", *, request_id: int = 0, flags: int = 0) -> list:
    """Return the frame as a list of buffers for ``socket.sendmsg`` (no payload copy).

    ``payload`` is one bytes-like object, or a list of them for a multipart frame.
    """
    if isinstance(payload, (list, tuple)):
        parts = [memoryview(part).cast("B") for part in payload]
        table = _U32.pack(len(parts)) + b"".join(_U64.pack(part.nbytes) for part in parts)
        length = len(table) + sum(part.nbytes for part in parts)
        header = HEADER.pack(MAGIC, VERSION, kind, flags | Flag.MULTIPART, request_id, length)
        return [header, table, *parts]
    length = memoryview(payload).nbytes
    return [HEADER.pack(MAGIC, VERSION, kind, flags, request_id, length), payload]


def frame_bytes(kind: Kind, payload=b"", *, request_id: int = 0, flags: int = 0) -> bytes:
    """The whole frame as one bytes object (tests and small control frames)."""
    return b"".join(bytes(part) for part in encode_frame(kind, payload, request_id=request_id, flags=flags))


def split_parts(frame: Frame) -> list[memoryview]:
    """The parts of a multipart frame, as zero-copy views of its payload."""
    view = memoryview(frame.payload)
    if not frame.flags & Flag.MULTIPART:
        return [view]
    try:
        (count,) = _U32.unpack_from(view, 0)
        offset = _U32.size + count * _U64.size
        if offset > view.nbytes:
            raise ProtocolError(f"multipart table of {count} parts is longer than the frame")
        parts = []
        for index in range(count):
            (size,) = _U64.unpack_from(view, _U32.size + index * _U64.size)
            if offset + size > view.nbytes:
                raise ProtocolError("multipart part runs past the end of the frame")
            parts.append(view[offset : offset + size])
            offset += size
    except struct.error as exc:
        raise ProtocolError(f"truncated multipart table: {exc}") from exc
    if offset != view.nbytes:
        raise ProtocolError("multipart frame has trailing bytes after its parts")
    return parts


class FrameDecoder:
    """Turns a byte stream into frames.

    ``max_payload`` can be raised once the connection is authenticated; until
    then it is ``HANDSHAKE_LIMIT`` and only handshake kinds are accepted.

    During the handshake ``feed`` returns at most one frame and keeps the rest
    buffered: a peer may send WELCOME and its first MESSAGE in one segment, and
    that MESSAGE's header must be judged after ``authenticated()``, not before.
    Call ``feed(b"")`` to go on decoding what is buffered.
    """

    def __init__(self, max_payload: int = HANDSHAKE_LIMIT, *, handshake: bool = True):
        self.max_payload = max_payload
        self.handshake = handshake
        self._buffer = bytearray()
        self._start = 0
        self._header: tuple | None = None
        self._large: bytearray | None = None  # the payload of a large frame, filled in place
        self._filled = 0

    def authenticated(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        """Leave the handshake: accept every kind and payloads up to ``max_payload``."""
        self.handshake = False
        self.max_payload = max_payload

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned in a frame (a header already parsed is not counted)."""
        return len(self._buffer) - self._start

    def feed(self, data) -> list[Frame]:
        """Add bytes; return the frames now complete (possibly none; at most one during the handshake).

        Raises:
            ProtocolError: bad magic or version, unknown or unexpected kind, or a
                length over the limit. The stream cannot be resynchronised after it.
        """
        if self._large is not None:
            data = self._fill_large(data)
            if self._filled < len(self._large):
                return []
            frames = [self._finish_large()]
            if self.handshake:
                self._buffer += data
                return frames
        else:
            frames = []
        self._buffer += data
        while True:
            if self._header is None:
                if len(self._buffer) - self._start < HEADER_SIZE:
                    break
                self._header = self._parse_header()
            kind, flags, request_id, length = self._header
            end = self._start + length
            if len(self._buffer) < end:
                if length >= LARGE_FRAME and not self.handshake:
                    self._begin_large(length)
                break
            with memoryview(self._buffer) as view:
                payload = bytes(view[self._start : end])
            self._start = end
            self._header = None
            frames.append(Frame(kind, flags, request_id, payload))
            if self.handshake:
                break
        if self._start and (self._start == len(self._buffer) or self._start > 65536):
            del self._buffer[: self._start]
            self._start = 0
        return frames

    # A large frame's payload goes straight into its own buffer, which the transport
    # may fill with recv_into (``receive_buffer``): one copy from the kernel, none after.

    def receive_buffer(self) -> memoryview | None:
        """Where the next bytes belong, if a large frame is being filled; else None."""
        if self._large is None:
            return None
        return memoryview(self._large)[self._filled :]

    def received_into(self, count: int) -> list[Frame]:
        """``count`` bytes were written into ``receive_buffer()``; return the finished frame, if any."""
        self._filled += count
        if self._filled < len(self._large):
            return []
        return [self._finish_large()]

    def _begin_large(self, length: int) -> None:
        self._large = bytearray(length)
        with memoryview(self._buffer) as view:
            self._fill_large(view[self._start :])
        del self._buffer[:]
        self._start = 0

    def _fill_large(self, data):
        take = min(len(data), len(self._large) - self._filled)
        self._large[self._filled : self._filled + take] = data[:take]
        self._filled += take
        if self._filled < len(self._large):
            return b""
        return data[take:]

    def _finish_large(self) -> Frame:
        kind, flags, request_id, _ = self._header
        payload, self._large, self._filled, self._header = self._large, None, 0, None
        return Frame(kind, flags, request_id, payload)

    def _parse_header(self) -> tuple:
        magic, version, kind, flags, request_id, length = HEADER.unpack_from(self._buffer, self._start)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r}: not a grid peer (expected {MAGIC!r})")
        if version != VERSION:
            raise ProtocolError(f"protocol version {version} is not supported (this member speaks {VERSION})")
        if kind not in _KNOWN_KINDS:
            raise ProtocolError(f"unknown frame kind {kind}")
        kind = Kind(kind)
        if self.handshake and kind not in HANDSHAKE_KINDS:
            raise ProtocolError(f"{kind.name} frame before authentication; only the handshake may be spoken")
        if length > self.max_payload:
            raise ProtocolError(f"{kind.name} frame of {length} bytes exceeds the limit of {self.max_payload}")
        self._start += HEADER_SIZE
        return kind, flags, request_id, length
