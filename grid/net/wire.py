"""Frames on the wire, sans-IO: bytes in, frames out; frames in, bytes out.

A frame is a fixed header followed by its payload::

    +-------+---------+------+-------+-----+------------+---------+
    | magic | version | kind | flags | pad | request id | length  |
    | 2s    | B       | B    | B     | x   | Q          | I       |
    +-------+---------+------+-------+-----+------------+---------+

The length counts everything after the header. On a link whose handshake turned
the frame MAC on (every TCP link without verified TLS), every frame after WELCOME,
both ways, ends in a 32-byte trailer counted in the length::

    header | payload (a plain payload, or a multipart table and its parts) | mac

    mac = HMAC-SHA256(direction key, header | payload | sequence)

The direction key comes from the handshake (``security.session_keys``); the
sequence is the frame's number on that link and in that direction, from 0, as an
unsigned 64-bit big-endian integer that is never sent: both ends count. A forged,
altered, replayed, reordered or dropped frame fails its MAC, and the decoder raises
``ProtocolError`` before the frame is handed up, so nothing of it is unpickled. The
MAC goes last, so a sender may write a large frame first and hash it while the bytes
travel, and the receiver hashes a large frame as its bytes arrive: the hashing
overlaps the transfer on both ends.

This module imports no socket, thread or clock: the decoder is fed bytes and
returns frames, so it can be tested one byte at a time. The length is checked
against the limit before any of the payload is buffered, and a large frame's
buffer grows as its bytes arrive: a header alone allocates next to nothing.
"""

from __future__ import annotations

import enum
import hmac
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
MAC_SIZE = 32  # the HMAC-SHA256 trailer of a frame on a MACed link
LIMIT_KEY = "max_frame_bytes"  # the config key of the limit after authentication, named in its error
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_READ_AHEAD = 1024 * 1024  # a large frame's buffer keeps this much room (or doubles) for the next read
_ZEROS = memoryview(bytes(1024 * 1024))  # what a large frame's buffer grows by (calloc'd: no memory until read)


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


def encode_frame(kind: Kind, payload=b"", *, request_id: int = 0, flags: int = 0, trailer: int = 0) -> list:
    """Return the frame as a list of buffers for ``socket.sendmsg`` (no payload copy).

    ``payload`` is one bytes-like object, or a list of them for a multipart frame.
    ``trailer`` bytes (a MAC, see ``FrameSealer``) are counted in the length; the
    caller appends them.
    """
    if isinstance(payload, (list, tuple)):
        parts = [memoryview(part).cast("B") for part in payload]
        table = _U32.pack(len(parts)) + b"".join(_U64.pack(part.nbytes) for part in parts)
        length = len(table) + sum(part.nbytes for part in parts) + trailer
        header = HEADER.pack(MAGIC, VERSION, kind, flags | Flag.MULTIPART, request_id, length)
        return [header, table, *parts]
    length = memoryview(payload).nbytes + trailer
    return [HEADER.pack(MAGIC, VERSION, kind, flags, request_id, length), payload]


class FrameSealer:
    """The sending half of a MACed link: the trailer of each frame, numbered in send order.

    ``prepare`` hashes a frame's buffers (the header and the payload, as memoryviews:
    no copy); ``seal`` adds the next sequence number and returns the 32-byte trailer.
    The caller sends one frame at a time, header to trailer, so the sequence numbers
    follow the bytes on the wire.
    """

    def __init__(self, key: bytes):
        self._base = hmac.new(key, digestmod="sha256")
        self.sequence = 0

    def prepare(self, buffers):
        """The MAC state over ``buffers`` (the header and the payload, as ``encode_frame`` gives them)."""
        state = self._base.copy()
        for buffer in buffers:
            state.update(buffer)
        return state

    def seal(self, state) -> bytes:
        """The trailer for the frame ``state`` was prepared for: it is the next one on the wire."""
        state.update(_U64.pack(self.sequence))
        self.sequence += 1
        return state.digest()


def seal_frame(sealer: FrameSealer, kind: Kind, payload=b"", *, request_id: int = 0, flags: int = 0) -> bytes:
    """One whole MACed frame as bytes (tests, and peers written by hand)."""
    buffers = encode_frame(kind, payload, request_id=request_id, flags=flags, trailer=MAC_SIZE)
    buffers.append(sealer.seal(sealer.prepare(buffers)))
    return b"".join(bytes(buffer) for buffer in buffers)


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

    With a ``mac_key`` given to ``authenticated()``, every later frame must end in
    its MAC (see the module docstring); a frame whose MAC does not match raises
    ``ProtocolError`` and is never returned.
    """

    def __init__(self, max_payload: int = HANDSHAKE_LIMIT, *, handshake: bool = True):
        self.max_payload = max_payload
        self.handshake = handshake
        self._buffer = bytearray()
        self._start = 0
        self._header: tuple | None = None
        self._large: bytearray | None = None  # the payload of a large frame, filled in place, grown as it fills
        self._length = 0  # the large frame's length (payload and trailer)
        self._filled = 0
        self._mac = None  # the HMAC of the link's incoming direction (before any data), or None
        self._trailer = 0  # MAC_SIZE on a MACed link
        self._sequence = 0  # the number of the next frame expected
        self._large_mac = None  # the large frame's MAC state, updated as its bytes arrive
        self._hashed = 0  # how many of the large frame's payload bytes are in _large_mac

    def authenticated(self, max_payload: int = DEFAULT_MAX_PAYLOAD, *, mac_key: bytes | None = None) -> None:
        """Leave the handshake: accept every kind and payloads up to ``max_payload``.

        ``mac_key``: the key of this direction; every frame from here on must carry its MAC.
        """
        self.handshake = False
        self.max_payload = max_payload
        if mac_key is not None:
            self._mac = hmac.new(mac_key, digestmod="sha256")
            self._trailer = MAC_SIZE

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned in a frame (a header already parsed is not counted)."""
        return len(self._buffer) - self._start

    def feed(self, data) -> list[Frame]:
        """Add bytes; return the frames now complete (possibly none; at most one during the handshake).

        Raises:
            ProtocolError: bad magic or version, unknown or unexpected kind, a length
                over the limit, or a frame that fails its MAC. The stream cannot be
                resynchronised after it.
        """
        if self._large is not None:
            data = self._fill_large(data)
            if self._filled < self._length:
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
            kind, flags, request_id, length, header = self._header
            end = self._start + length
            if len(self._buffer) < end:
                if length >= LARGE_FRAME and not self.handshake:
                    self._begin_large(length)
                break
            with memoryview(self._buffer) as view:
                if self._mac is None:
                    payload = bytes(view[self._start : end])
                else:
                    body_end = end - MAC_SIZE
                    state = self._mac.copy()
                    state.update(header)
                    state.update(view[self._start : body_end])
                    self._check_mac(state, view[body_end:end], kind)
                    payload = bytes(view[self._start : body_end])
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
    # The buffer starts at 64 KiB (or 4x the bytes that came with the header) and grows as it
    # fills (doubling, or 1 MiB of room for the next read), so it is never much more than what
    # arrived: a header that announces 512 MB costs 64 KiB until the bytes come.

    def receive_buffer(self) -> memoryview | None:
        """Where the next bytes belong, if a large frame is being filled; else None."""
        if self._large is None:
            return None
        if len(self._large) - self._filled < _READ_AHEAD and len(self._large) < self._length:
            self._grow(self._filled + _READ_AHEAD)  # room for what one read may bring: fewer, larger reads
        return memoryview(self._large)[self._filled :]

    def received_into(self, count: int) -> list[Frame]:
        """``count`` bytes were written into ``receive_buffer()``; return the finished frame, if any."""
        self._filled += count
        self._hash_filled()
        if self._filled < self._length:
            return []
        return [self._finish_large()]

    def _begin_large(self, length: int) -> None:
        self._length = length
        self._large = bytearray()
        if self._mac is not None:
            self._large_mac = self._mac.copy()
            self._large_mac.update(self._header[4])
            self._hashed = 0
        with memoryview(self._buffer) as view:
            arrived = view[self._start :]
            # Bytes that came with the header promise more: room for 4x them at once (a 1 MB
            # frame usually gets its whole buffer here, no regrowth), but never for a bare header.
            self._grow(min(length, 4 * arrived.nbytes))
            self._fill_large(arrived)
            arrived.release()
        del self._buffer[:]
        self._start = 0

    def _grow(self, needed: int) -> None:
        """Make room for at least ``needed`` bytes, doubling (never past the frame's length)."""
        large = self._large
        size = min(self._length, max(needed, 2 * len(large), LARGE_FRAME))
        # From one shared zero buffer: a fresh ``bytes(n)`` each time costs page faults on
        # memory that is mapped and unmapped at once (10x the copy here); a large bytearray's
        # realloc is an mremap, not a copy.
        while len(large) < size:
            large += _ZEROS[: size - len(large)]

    def _fill_large(self, data):
        take = min(len(data), self._length - self._filled)
        if self._filled + take > len(self._large):
            self._grow(self._filled + take)
        self._large[self._filled : self._filled + take] = data[:take]
        self._filled += take
        self._hash_filled()
        if self._filled < self._length:
            return b""
        return data[take:]

    def _hash_filled(self) -> None:
        # Hash what arrived as it arrives: the MAC is nearly done when the last byte is in.
        if self._large_mac is None:
            return
        upto = min(self._filled, self._length - MAC_SIZE)
        if upto > self._hashed:
            with memoryview(self._large) as view:
                self._large_mac.update(view[self._hashed : upto])
            self._hashed = upto

    def _finish_large(self) -> Frame:
        kind, flags, request_id, _, _ = self._header
        payload, self._large, self._filled, self._header = self._large, None, 0, None
        if self._large_mac is not None:
            state, self._large_mac = self._large_mac, None
            body_end = self._length - MAC_SIZE
            self._check_mac(state, bytes(payload[body_end:]), kind)
            del payload[body_end:]  # shrinking at the end: no copy
        return Frame(kind, flags, request_id, payload)

    def _check_mac(self, state, received, kind: Kind) -> None:
        state.update(_U64.pack(self._sequence))
        if not hmac.compare_digest(state.digest(), received):
            raise ProtocolError(
                f"{kind.name} frame #{self._sequence} failed its MAC check: it was forged, altered, replayed "
                "or reordered on the way (or the peer's session key differs); closing the link")
        self._sequence += 1

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
        if self.handshake and length > self.max_payload:
            raise ProtocolError(f"{kind.name} frame of {length} bytes exceeds the limit of {self.max_payload} "
                                "bytes for a handshake frame")
        if length - self._trailer > self.max_payload:
            raise ProtocolError(f"{kind.name} frame of {length - self._trailer} bytes exceeds the limit of "
                                f"{self.max_payload} bytes ({LIMIT_KEY} in the config); raise {LIMIT_KEY} on "
                                "the receiving side to accept it")
        if length < self._trailer:
            raise ProtocolError(f"{kind.name} frame of {length} bytes is too short for its {self._trailer}-byte "
                                "MAC: the peer does not MAC its frames")
        header = None
        if self._mac is not None:
            header = bytes(self._buffer[self._start : self._start + HEADER_SIZE])
        self._start += HEADER_SIZE
        return kind, flags, request_id, length, header
