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
buffer grows as its bytes arrive: a header alone allocates next to nothing. A
large frame's buffer is reused for a later one once nothing refers to it any more
(see ``FrameDecoder``): fresh memory costs more than the bytes' copy.
"""

from __future__ import annotations

import enum
import hmac
import struct
import sys
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
_SPARES = 4  # buffers of finished large frames a decoder keeps for later ones, at most ...
_SPARE_BYTES = 64 * 1024 * 1024  # ... and their total size, at most


def _references(items: list, index: int) -> int:
    """How many references ``items[index]`` has, as counted from here."""
    return sys.getrefcount(items[index])


# What _references says when nothing but the list holds the object. Without reference counts
# (not CPython) a spare cannot be known to be free, so none is ever reused.
_ONLY_IN_A_LIST = _references([bytearray()], 0) if hasattr(sys, "getrefcount") else None


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
_KIND_OF = {int(kind): kind for kind in Kind}  # (a dict lookup: calling Kind(n) costs 15x more)


class Flag(enum.IntFlag):
    NONE = 0
    MULTIPART = 1  # payload is a part table followed by the parts (out-of-band buffers)
    ERROR = 2  # a RESPONSE that carries an error instead of a result


# As plain ints for the per-frame paths: ``flags & Flag.MULTIPART`` builds a Flag, 50x the cost of ``&``.
MULTIPART_BIT = int(Flag.MULTIPART)
ERROR_BIT = int(Flag.ERROR)


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
        header = HEADER.pack(MAGIC, VERSION, kind, flags | MULTIPART_BIT, request_id, length)
        return [header, table, *parts]
    length = (len(payload) if type(payload) is bytes else memoryview(payload).nbytes) + trailer
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
    if not frame.flags & MULTIPART_BIT:
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

    ``feed`` keeps nothing of the bytes it is given (what it keeps, it copies), so the
    caller may read into one buffer over and over. A small frame's payload is ``bytes``;
    a large one's (``LARGE_FRAME`` and more) is a memoryview of a buffer of its own,
    which the decoder reuses for a later large frame once nothing refers to it any more.
    """

    def __init__(self, max_payload: int = HANDSHAKE_LIMIT, *, handshake: bool = True):
        self.max_payload = max_payload
        self.handshake = handshake
        self._buffer = bytearray()  # the start of a frame that has not fully arrived
        self._start = 0
        self._header: tuple | None = None
        self._large: bytearray | None = None  # the buffer a large frame is filling, grown as it fills
        self._length = 0  # the large frame's length (payload and trailer)
        self._filled = 0
        self._spares: list[bytearray] = []  # buffers of earlier large frames, reused once nothing holds them
        self.large_frames = 0  # large frames decoded so far
        self._mac = None  # the HMAC of the link's incoming direction (before any data), or None
        self._trailer = 0  # MAC_SIZE on a MACed link
        self._sequence = 0  # the number of the next frame expected
        self._large_mac = None  # the large frame's MAC state, updated as its bytes arrive
        self._hashed = 0  # how many of the large frame's payload bytes are in _large_mac
        self._broken: ProtocolError | None = None  # the error that ended the stream: it cannot resynchronise

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
        if self._broken is not None:
            raise ProtocolError(f"the stream broke earlier and cannot be resynchronised: {self._broken}")
        try:
            return self._feed(data)
        except ProtocolError as exc:
            self._broken = exc
            raise

    def _feed(self, data) -> list[Frame]:
        frames = []
        if self._large is not None:
            data = self._fill_large(data)
            if self._filled < self._length:
                return frames
            frames.append(self._finish_large())
            if self.handshake:
                self._buffer += data
                return frames
        if self._start < len(self._buffer):  # a frame's start is buffered: the rest goes after it
            self._buffer += data
            with memoryview(self._buffer) as view:
                self._start = self._decode(view, self._start, frames)
            if self._start == len(self._buffer) or self._start > 65536:
                del self._buffer[: self._start]
                self._start = 0
        else:  # the usual case: frames straight from ``data``, and only an unfinished one's start kept
            view = memoryview(data)
            used = self._decode(view, 0, frames)
            if used < view.nbytes:
                self._buffer[:] = view[used:]
                self._start = 0
            elif self._buffer:
                self._buffer.clear()
                self._start = 0
        return frames

    def _decode(self, view: memoryview, offset: int, frames: list) -> int:
        """Append the frames complete in ``view`` from ``offset``; return where the undecoded rest starts."""
        size = view.nbytes
        while True:
            if self._header is None:
                if size - offset < HEADER_SIZE:
                    return offset
                self._header = self._parse_header(view, offset)
                offset += HEADER_SIZE
            kind, flags, request_id, length, header = self._header
            end = offset + length
            if size < end:
                if length >= LARGE_FRAME and not self.handshake:
                    self._begin_large(length, view[offset:])
                    return size
                return offset
            if self._mac is None:
                payload = bytes(view[offset:end])
            else:
                body_end = end - MAC_SIZE
                state = self._mac.copy()
                state.update(header)
                state.update(view[offset:body_end])
                self._check_mac(state, view[body_end:end], kind)
                payload = bytes(view[offset:body_end])
            offset = end
            self._header = None
            frames.append(Frame(kind, flags, request_id, payload))
            if self.handshake:
                return offset

    # A large frame's payload goes straight into its own buffer, which the transport
    # may fill with recv_into (``receive_buffer``): one copy from the kernel, none after.
    # A new buffer starts at 64 KiB (or 4x the bytes that came with the header) and grows as
    # it fills (doubling, or 1 MiB of room for the next read), so it is never much more than
    # what arrived: a header that announces 512 MB costs 64 KiB until the bytes come.
    #
    # Fresh memory is costly: the page faults of a new megabyte (and its zeroing) cost more
    # than its copy, and giving it back costs a TLB shootdown on every core running one of
    # our threads. So a finished frame's buffer is kept as a spare, and a later large frame
    # takes a spare that nothing refers to any more: neither the frame's payload, nor a view
    # of it, nor an object unpickled from it (a memoryview result, a NumPy array on an
    # out-of-band buffer). Its reference count says so; nothing else can reach it then.

    def receive_buffer(self) -> memoryview | None:
        """Where the next bytes belong, if a large frame is being filled; else None."""
        if self._large is None:
            return None
        if len(self._large) - self._filled < _READ_AHEAD and len(self._large) < self._length:
            self._grow(self._filled + _READ_AHEAD)  # room for what one read may bring: fewer, larger reads
        return memoryview(self._large)[self._filled : self._length]

    def received_into(self, count: int) -> list[Frame]:
        """``count`` bytes were written into ``receive_buffer()``; return the finished frame, if any."""
        self._filled += count
        self._hash_filled()
        if self._filled < self._length:
            return []
        try:
            return [self._finish_large()]
        except ProtocolError as exc:
            self._broken = exc
            raise

    def release_spares(self) -> None:
        """Let go of the buffers kept for later large frames (the link went quiet)."""
        self._spares.clear()

    @property
    def spare_bytes(self) -> int:
        """The size of the buffers kept for later large frames (some may still be in use)."""
        return sum(len(spare) for spare in self._spares)

    def _begin_large(self, length: int, arrived: memoryview) -> None:
        self._length = length
        self._large = self._spare_for(length)
        if self._mac is not None:
            self._large_mac = self._mac.copy()
            self._large_mac.update(self._header[4])
            self._hashed = 0
        # Bytes that came with the header promise more: room for 4x them at once (a 1 MB
        # frame usually gets its whole buffer here, no regrowth), but never for a bare header.
        self._grow(min(length, 4 * arrived.nbytes))
        self._fill_large(arrived)

    def _spare_for(self, length: int) -> bytearray:
        """A spare nothing else refers to, at most twice ``length`` (a view kept of the frame
        should not hold much more), the largest such; else a new, empty buffer."""
        spares = self._spares
        best, best_size = None, -1
        for index in range(len(spares) if _ONLY_IN_A_LIST is not None else 0):
            if _references(spares, index) == _ONLY_IN_A_LIST:
                size = len(spares[index])
                if best_size < size <= 2 * length:
                    best, best_size = index, size
        return bytearray() if best is None else spares[best]

    def _keep_spare(self, buffer: bytearray) -> None:
        spares = self._spares
        if any(spare is buffer for spare in spares) or len(buffer) > _SPARE_BYTES:
            return
        spares.append(buffer)
        while len(spares) > _SPARES or sum(len(spare) for spare in spares) > _SPARE_BYTES:
            del spares[0]  # the oldest: if something still holds it, it is freed when that lets go

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
        buffer, length = self._large, self._length
        self._large, self._filled, self._header = None, 0, None
        end = length
        if self._large_mac is not None:
            state, self._large_mac = self._large_mac, None
            end = length - MAC_SIZE
            self._check_mac(state, bytes(buffer[end:length]), kind)
        self.large_frames += 1
        self._keep_spare(buffer)
        return Frame(kind, flags, request_id, memoryview(buffer)[:end])

    def _check_mac(self, state, received, kind: Kind) -> None:
        state.update(_U64.pack(self._sequence))
        if not hmac.compare_digest(state.digest(), received):
            raise ProtocolError(
                f"{kind.name} frame #{self._sequence} failed its MAC check: it was forged, altered, replayed "
                "or reordered on the way (or the peer's session key differs); closing the link")
        self._sequence += 1

    def _parse_header(self, view: memoryview, offset: int) -> tuple:
        magic, version, kind, flags, request_id, length = HEADER.unpack_from(view, offset)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r}: not a grid peer (expected {MAGIC!r})")
        if version != VERSION:
            raise ProtocolError(f"protocol version {version} is not supported (this member speaks {VERSION})")
        known = _KIND_OF.get(kind)
        if known is None:
            raise ProtocolError(f"unknown frame kind {kind}")
        kind = known
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
            header = bytes(view[offset : offset + HEADER_SIZE])
        return kind, flags, request_id, length, header
