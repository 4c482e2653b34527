"""Frames, sans-IO: bytes in, frames out, fed whole, in one chunk, or a byte at a time."""

from __future__ import annotations

import hashlib
import hmac
import random
import struct
import tracemalloc

import pytest

from grid.net import wire
from grid.errors import ProtocolError
from grid.net.wire import HEADER, HEADER_SIZE, MAGIC, VERSION, Flag, Frame, FrameDecoder, Kind, frame_bytes, split_parts


def open_decoder(max_payload: int = wire.DEFAULT_MAX_PAYLOAD) -> FrameDecoder:
    decoder = FrameDecoder()
    decoder.authenticated(max_payload)
    return decoder


def raw_header(kind=Kind.HELLO, length=0, *, magic=MAGIC, version=VERSION, flags=0, request_id=0) -> bytes:
    return HEADER.pack(magic, version, int(kind), flags, request_id, length)


def feed_bytewise(decoder: FrameDecoder, data: bytes) -> list[Frame]:
    frames = []
    for index in range(len(data)):
        frames += decoder.feed(data[index : index + 1])
    return frames


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("kind", list(Kind), ids=lambda kind: kind.name)
def test_every_kind_round_trips(kind):
    decoder = open_decoder()
    data = frame_bytes(kind, b"payload of " + kind.name.encode(), request_id=2**64 - 1, flags=Flag.ERROR)

    (frame,) = decoder.feed(data)

    assert frame == Frame(kind, Flag.ERROR, 2**64 - 1, b"payload of " + kind.name.encode())
    assert isinstance(frame.kind, Kind)
    assert decoder.buffered == 0


@pytest.mark.parametrize("kind", sorted(wire.HANDSHAKE_KINDS), ids=lambda kind: kind.name)
def test_handshake_kinds_pass_before_authentication(kind):
    (frame,) = FrameDecoder().feed(frame_bytes(kind, b'{"a":1}'))

    assert (frame.kind, frame.payload) == (kind, b'{"a":1}')


def test_header_layout_is_fixed():
    data = frame_bytes(Kind.REQUEST, b"xyz", request_id=7, flags=Flag.ERROR)

    assert HEADER_SIZE == 18
    assert data[:2] == b"GR"
    assert struct.unpack("!2sBBBxQI", data[:HEADER_SIZE]) == (b"GR", VERSION, 17, 2, 7, 3)
    assert data[HEADER_SIZE:] == b"xyz"


def test_encode_frame_gives_buffers_without_copying_the_payload():
    payload = bytearray(b"x" * 100)

    buffers = wire.encode_frame(Kind.MESSAGE, payload)

    assert buffers[-1] is payload


def test_empty_payload_round_trips():
    (frame,) = open_decoder().feed(frame_bytes(Kind.MESSAGE))

    assert frame.payload == b""


def test_fed_one_byte_at_a_time():
    decoder = open_decoder()
    frames_out = [(Kind.MESSAGE, b"first", 0), (Kind.REQUEST, b"second" * 10, 5), (Kind.RESPONSE, b"", 5)]
    data = b"".join(frame_bytes(kind, payload, request_id=rid) for kind, payload, rid in frames_out)

    frames = feed_bytewise(decoder, data)

    assert [(f.kind, f.payload, f.request_id) for f in frames] == frames_out
    assert decoder.buffered == 0


def test_nothing_is_returned_until_the_frame_is_complete():
    decoder = open_decoder()
    data = frame_bytes(Kind.MESSAGE, b"abcdef")

    assert decoder.feed(data[:HEADER_SIZE]) == []
    assert decoder.feed(data[HEADER_SIZE:-1]) == []
    assert decoder.buffered == 5
    assert decoder.feed(data[-1:])[0].payload == b"abcdef"


def test_many_frames_in_one_chunk():
    decoder = open_decoder()
    data = b"".join(frame_bytes(Kind.MESSAGE, str(number).encode(), request_id=number) for number in range(500))

    frames = decoder.feed(data + frame_bytes(Kind.MESSAGE, b"partial")[:-3])

    assert [frame.request_id for frame in frames] == list(range(500))
    assert [frame.payload for frame in frames[:3]] == [b"0", b"1", b"2"]
    assert decoder.buffered == len(b"partial") - 3  # the parsed header is not counted


def test_decoder_accepts_memoryview_and_bytearray():
    decoder = open_decoder()
    data = frame_bytes(Kind.MESSAGE, b"hello")

    frames = decoder.feed(memoryview(data)[:7]) + decoder.feed(bytearray(data[7:]))

    assert frames[0].payload == b"hello"


def test_buffer_is_compacted_after_many_frames():
    decoder = open_decoder()
    one = frame_bytes(Kind.MESSAGE, b"z" * 1000)

    for _ in range(200):
        decoder.feed(one + one[:10])
        decoder.feed(one[10:])

    assert decoder.buffered == 0
    assert len(decoder._buffer) < 2 * 65536


def test_handshake_mode_returns_one_frame_per_feed_so_the_caller_can_switch_modes():
    # A server may send WELCOME and its first MESSAGE in one segment: the MESSAGE
    # header must be judged after authenticated(), not before.
    decoder = FrameDecoder()
    data = frame_bytes(Kind.WELCOME) + frame_bytes(Kind.MESSAGE, b"m" * 10_000)

    (welcome,) = decoder.feed(data)
    assert welcome.kind == Kind.WELCOME
    decoder.authenticated()
    (message,) = decoder.feed(b"")

    assert message.payload == b"m" * 10_000


def test_a_second_handshake_frame_waits_for_the_next_feed():
    decoder = FrameDecoder()
    data = frame_bytes(Kind.HELLO, b"{}") + frame_bytes(Kind.PROOF, b"p")

    assert [frame.kind for frame in decoder.feed(data)] == [Kind.HELLO]
    assert [frame.kind for frame in decoder.feed(b"")] == [Kind.PROOF]
    assert decoder.feed(b"") == []


def test_a_message_queued_behind_a_handshake_frame_is_still_refused_if_not_authenticated():
    decoder = FrameDecoder()
    decoder.feed(frame_bytes(Kind.CHALLENGE, b"c") + frame_bytes(Kind.MESSAGE, b"m"))

    with pytest.raises(ProtocolError, match="before authentication"):
        decoder.feed(b"")


# ------------------------------------------------------------------ multipart


def test_multipart_round_trip_gives_zero_copy_views():
    parts = [b"head", bytearray(b""), memoryview(b"x" * 1000), b"tail"]
    decoder = open_decoder()

    (frame,) = feed_bytewise(decoder, frame_bytes(Kind.MESSAGE, parts, request_id=3))
    views = split_parts(frame)

    assert frame.flags & Flag.MULTIPART
    assert [bytes(view) for view in views] == [b"head", b"", b"x" * 1000, b"tail"]
    assert all(isinstance(view, memoryview) for view in views)
    assert all(view.obj is frame.payload for view in views)


def test_multipart_keeps_other_flags():
    (frame,) = open_decoder().feed(frame_bytes(Kind.RESPONSE, [b"a", b"b"], flags=Flag.ERROR))

    assert frame.flags == Flag.MULTIPART | Flag.ERROR
    assert [bytes(view) for view in split_parts(frame)] == [b"a", b"b"]


def test_multipart_of_non_byte_buffers_counts_bytes():
    import array

    numbers = array.array("d", [1.5, 2.5, 3.5])

    (frame,) = open_decoder().feed(frame_bytes(Kind.MESSAGE, [numbers]))

    assert bytes(split_parts(frame)[0]) == numbers.tobytes()


def test_multipart_with_no_parts():
    (frame,) = open_decoder().feed(frame_bytes(Kind.MESSAGE, []))

    assert split_parts(frame) == []


def test_split_parts_of_a_plain_frame_is_its_payload():
    frame = Frame(Kind.MESSAGE, 0, 0, b"whole")

    assert [bytes(view) for view in split_parts(frame)] == [b"whole"]


def multipart(table: bytes, body: bytes = b"") -> Frame:
    return Frame(Kind.MESSAGE, Flag.MULTIPART, 0, table + body)


@pytest.mark.parametrize(
    "frame, message",
    [
        (multipart(b"\x00\x00"), "truncated multipart table"),
        (multipart(struct.pack("!I", 2**32 - 1)), "longer than the frame"),
        (multipart(struct.pack("!IQ", 1, 10), b"short"), "runs past the end"),
        (multipart(struct.pack("!IQ", 1, 2**64 - 1), b"x"), "runs past the end"),
        (multipart(struct.pack("!IQ", 1, 2), b"abc"), "trailing bytes"),
    ],
    ids=["truncated-count", "huge-count", "part-too-long", "part-huge", "trailing-bytes"],
)
def test_bad_multipart_tables_raise_protocol_error(frame, message):
    with pytest.raises(ProtocolError, match=message):
        split_parts(frame)


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "header, message",
    [
        (raw_header(magic=b"HT"), "bad magic"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic"),
        (raw_header(version=VERSION + 1), "version 2 is not supported"),
        (raw_header(kind=99), "unknown frame kind 99"),
        (raw_header(kind=0), "unknown frame kind 0"),
        (raw_header(kind=Kind.MESSAGE), "MESSAGE frame before authentication"),
        (raw_header(kind=Kind.REQUEST), "REQUEST frame before authentication"),
        (raw_header(kind=Kind.RESPONSE), "RESPONSE frame before authentication"),
    ],
    ids=["magic", "http", "version", "kind-99", "kind-0", "message", "request", "response"],
)
def test_bad_headers_are_refused_before_authentication(header, message):
    with pytest.raises(ProtocolError, match=message):
        FrameDecoder().feed(header)


@pytest.mark.parametrize("kind", [99, 6, 15, 19, 255])
def test_unknown_kinds_are_refused_after_authentication_too(kind):
    with pytest.raises(ProtocolError, match=f"unknown frame kind {kind}"):
        open_decoder().feed(raw_header(kind=kind))


def test_bad_header_is_detected_byte_by_byte_as_soon_as_it_is_complete():
    decoder = FrameDecoder()
    header = raw_header(magic=b"XX")

    for index in range(HEADER_SIZE - 1):
        assert decoder.feed(header[index : index + 1]) == []
    with pytest.raises(ProtocolError, match="bad magic"):
        decoder.feed(header[-1:])


def test_oversize_handshake_frame_is_refused_on_its_header_before_the_payload_arrives():
    decoder = FrameDecoder()

    with pytest.raises(ProtocolError, match="exceeds the limit of 4096"):
        decoder.feed(raw_header(kind=Kind.HELLO, length=wire.HANDSHAKE_LIMIT + 1))

    assert decoder.buffered <= HEADER_SIZE


def test_handshake_frame_at_the_limit_is_accepted():
    (frame,) = FrameDecoder().feed(frame_bytes(Kind.HELLO, b"h" * wire.HANDSHAKE_LIMIT))

    assert len(frame.payload) == wire.HANDSHAKE_LIMIT


def test_oversize_frame_after_authentication_is_refused_on_its_header():
    decoder = open_decoder(max_payload=1000)
    decoder.feed(frame_bytes(Kind.MESSAGE, b"ok"))

    with pytest.raises(ProtocolError, match="MESSAGE frame of 1001 bytes exceeds the limit of 1000"):
        decoder.feed(raw_header(kind=Kind.MESSAGE, length=1001))
    assert decoder.buffered <= HEADER_SIZE


def test_largest_declared_length_is_refused_without_buffering():
    decoder = open_decoder()

    with pytest.raises(ProtocolError, match="exceeds the limit"):
        feed_bytewise(decoder, raw_header(kind=Kind.MESSAGE, length=2**32 - 1))
    assert decoder.buffered <= HEADER_SIZE


def test_large_frames_are_accepted_after_authentication():
    decoder = FrameDecoder()
    big = b"\x01" * (3 * 1024 * 1024)
    data = frame_bytes(Kind.MESSAGE, big)
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(data)

    decoder.authenticated()
    frames = []
    for start in range(0, len(data), 256 * 1024):
        frames += decoder.feed(data[start : start + 256 * 1024])

    assert len(frames) == 1 and frames[0].payload == big


def test_the_error_is_sticky_the_stream_cannot_resynchronise():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(b"garbage that is long enough for a header")

    with pytest.raises(ProtocolError):
        decoder.feed(frame_bytes(Kind.HELLO, b"{}"))


def test_wire_does_no_io():
    source = open(wire.__file__, encoding="utf-8").read()

    for module in ("socket", "threading", "time", "selectors"):
        assert f"import {module}" not in source


@pytest.mark.parametrize("in_place", [False, True], ids=["feed", "recv_into"])
def test_large_frames_among_small_ones_in_any_chunking(in_place):
    rng = random.Random(7)
    sizes = [rng.choice([0, 5, 100, wire.LARGE_FRAME - 1, wire.LARGE_FRAME, 300_000]) for _ in range(60)]
    stream = b"".join(wire.frame_bytes(wire.Kind.MESSAGE, bytes([i % 251]) * size, request_id=i)
                      for i, size in enumerate(sizes))
    decoder = wire.FrameDecoder()
    decoder.authenticated()
    frames = decode_in_steps(decoder, stream, rng, in_place)
    assert [f.request_id for f in frames] == list(range(60))
    assert [len(f.payload) for f in frames] == sizes
    assert all(bytes(f.payload) == bytes([f.request_id % 251]) * len(f.payload) for f in frames)


# ------------------------------------------------------------------ the frame MAC

KEY = b"k" * 32


def mac_decoder(key: bytes = KEY, max_payload: int = wire.DEFAULT_MAX_PAYLOAD) -> FrameDecoder:
    decoder = FrameDecoder()
    decoder.authenticated(max_payload, mac_key=key)
    return decoder


def sealed_stream(payloads, key: bytes = KEY) -> bytes:
    sealer = wire.FrameSealer(key)
    return b"".join(wire.seal_frame(sealer, Kind.MESSAGE, payload, request_id=index)
                    for index, payload in enumerate(payloads))


def test_sealed_frames_decode_fed_byte_by_byte_and_the_mac_is_not_in_the_payload():
    stream = sealed_stream([b"one", b"", [b"multi", b"part"]])

    frames = feed_bytewise(mac_decoder(), stream)

    assert [bytes(f.payload) for f in frames[:2]] == [b"one", b""]
    assert [bytes(part) for part in split_parts(frames[2])] == [b"multi", b"part"]
    multipart_body = len(wire.frame_bytes(Kind.MESSAGE, [b"multi", b"part"])) - HEADER_SIZE
    assert len(stream) == 3 * (HEADER_SIZE + wire.MAC_SIZE) + 3 + multipart_body


def test_the_mac_covers_header_payload_and_sequence():
    sealer = wire.FrameSealer(KEY)
    frame = wire.seal_frame(sealer, Kind.MESSAGE, b"payload", request_id=3)
    expected = hmac.new(KEY, frame[:-wire.MAC_SIZE] + struct.pack("!Q", 0), hashlib.sha256).digest()
    assert frame[-wire.MAC_SIZE:] == expected
    second = wire.seal_frame(sealer, Kind.MESSAGE, b"payload", request_id=3)
    assert second[:-wire.MAC_SIZE] == frame[:-wire.MAC_SIZE] and second[-wire.MAC_SIZE:] != frame[-wire.MAC_SIZE:]


@pytest.mark.parametrize("tamper", ["wrong key", "replay", "swap", "bit flip", "no mac"])
def test_a_frame_that_fails_its_mac_raises_and_is_not_returned(tamper):
    first = sealed_stream([b"first"])
    second = sealed_stream([b"first", b"second"])[len(first):]
    stream = {
        "wrong key": sealed_stream([b"first"], key=b"x" * 32),
        "replay": first + first,
        "swap": second + first,
        "bit flip": first[:-33] + bytes([first[-33] ^ 1]) + first[-32:],
        "no mac": frame_bytes(Kind.MESSAGE, b"first" * 10),
    }[tamper]
    decoder = mac_decoder()

    frames = []
    with pytest.raises(ProtocolError, match="failed its MAC check|too short"):
        for index in range(len(stream)):
            frames += decoder.feed(stream[index : index + 1])

    assert frames == ([Frame(Kind.MESSAGE, 0, 0, b"first")] if tamper == "replay" else [])


@pytest.mark.parametrize("in_place", [False, True], ids=["feed", "recv_into"])
def test_large_sealed_frames_are_checked_as_they_arrive(in_place):
    rng = random.Random(11)
    sizes = [rng.choice([0, 7, wire.LARGE_FRAME - wire.MAC_SIZE, wire.LARGE_FRAME, 500_000]) for _ in range(30)]
    sizes[-1] = 500_000
    payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    stream = bytearray(sealed_stream(payloads))
    frames = decode_in_steps(mac_decoder(), bytes(stream), rng, in_place)
    assert [bytes(f.payload) for f in frames] == payloads
    # The same stream with one byte of the last large payload changed: refused, never returned.
    last = len(stream) - wire.MAC_SIZE - 1000
    stream[last] ^= 0xFF
    with pytest.raises(ProtocolError, match="frame #29 failed its MAC check"):
        decode_in_steps(mac_decoder(), bytes(stream), rng, in_place)


def decode_in_steps(decoder, stream, rng, in_place) -> list[Frame]:
    frames, position = [], 0
    while position < len(stream):
        step = rng.choice([1, 17, 4096, 70_000, 400_000])
        target = decoder.receive_buffer() if in_place else None
        if target is not None:
            step = min(step, len(target), len(stream) - position)
            target[:step] = stream[position:position + step]
            target.release()
            frames += decoder.received_into(step)
        else:
            frames += decoder.feed(stream[position:position + step])
        position += step
    return frames


def test_the_limit_after_authentication_names_its_config_key_and_excludes_the_mac():
    decoder = mac_decoder(max_payload=1000)
    decoder.feed(sealed_stream([b"x" * 1000]))  # exactly at the limit: the MAC is not counted

    message = r"1001 bytes exceeds the limit of 1000 bytes \(max_frame_bytes in the config\)"
    with pytest.raises(ProtocolError, match=message):
        decoder.feed(raw_header(kind=Kind.MESSAGE, length=1001 + wire.MAC_SIZE))


# ------------------------------------------------------------------ memory


def test_a_header_announcing_a_huge_frame_allocates_little():
    tracemalloc.start()
    try:
        decoders = [open_decoder() for _ in range(3)]
        for one in decoders:  # the finding: three such headers took a member to 1.6 GB
            one.feed(raw_header(kind=Kind.MESSAGE, length=wire.DEFAULT_MAX_PAYLOAD) + b"x" * 100)
        _, header_only = tracemalloc.get_traced_memory()
        for one in decoders:  # the socket is readable again: room for one read, not for the frame
            one.receive_buffer().release()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert header_only < 3 * 100 * 1024, f"{header_only} bytes allocated for three headers"
    assert peak < 3 * 1.2 * 1024 * 1024, f"{peak} bytes allocated for three headers and their next reads"


def test_a_large_frame_buffer_grows_with_what_arrives_and_ends_exact():
    decoder = open_decoder()
    length = 5 * 1024 * 1024 + 3
    decoder.feed(raw_header(kind=Kind.MESSAGE, length=length))
    received, sizes = 0, []
    frames = []
    while not frames:
        target = decoder.receive_buffer()
        sizes.append((received, received + len(target)))
        count = min(len(target), 300_000)
        target[:count] = b"\x07" * count
        target.release()
        received += count
        frames = decoder.received_into(count)
    assert all(capacity <= 2 * (before + 1024 * 1024) for before, capacity in sizes)  # never far ahead
    assert len(frames[0].payload) == length and bytes(frames[0].payload).count(7) == length
