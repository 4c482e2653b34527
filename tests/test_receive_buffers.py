"""Receive buffers are reused, and never under anything that still refers to them.

A connection reads into one buffer of its own, over and over, and the decoder copies what
it keeps; a large frame's payload is a view of a buffer the decoder reuses for a later
large frame once nothing refers to it any more. What may refer to it: the frame, a view of
its parts, and what was unpickled from them (a ``memoryview`` value on an out-of-band
buffer, an argument a queued task still holds). These tests hold such things while later
frames arrive, sans-IO, over a link and through an executor, and check nothing changed.
"""

from __future__ import annotations

import gc
import hashlib
import os
import sys
import threading
import types
import weakref

import pytest

from grid.compute import worker
from grid.compute.protocol import CALL, OK, pack_arguments
from grid.net import connection, messaging, serialize, wire
from grid.net.transport import Transport
from grid.net.wire import Kind

from . import executor_helpers as helpers
from .conftest import wait_for
from .test_transport import LOOPBACK, WAIT, ManualClock

SIZE = 300_000  # a large frame (>= wire.LARGE_FRAME), a few reads' worth
KEY = hashlib.sha256(b"receive buffers").digest()


def filled(byte: int, size: int = SIZE) -> bytes:
    return bytes([byte]) * size


def decoder_and_sender(mac: bool):
    """An authenticated decoder and a function giving the bytes of one frame for it."""
    decoder = wire.FrameDecoder()
    if not mac:
        decoder.authenticated()
        return decoder, lambda payload: wire.frame_bytes(Kind.MESSAGE, payload)
    decoder.authenticated(mac_key=KEY)
    sealer = wire.FrameSealer(KEY)
    return decoder, lambda payload: wire.seal_frame(sealer, Kind.MESSAGE, payload)


def receive(decoder: wire.FrameDecoder, data: bytes, step: int = 65536) -> list[wire.Frame]:
    """Feed ``data`` as a connection does: through one reused read buffer, then in place."""
    inbox = bytearray(step)
    frames, position = [], 0
    while position < len(data):
        target = decoder.receive_buffer()
        if target is not None:
            count = min(len(target), step, len(data) - position)
            target[:count] = data[position:position + count]
            target.release()
            frames += decoder.received_into(count)
        else:
            count = min(step, len(data) - position)
            inbox[:count] = data[position:position + count]
            frames += decoder.feed(memoryview(inbox)[:count])
            inbox[:count] = b"\xee" * count  # the next read overwrites it: nothing may still point here
        position += count
    return frames


# ------------------------------------------------------------------ sans-IO


@pytest.mark.parametrize("mac", [False, True], ids=["plain", "mac"])
def test_a_large_payload_that_is_held_survives_later_large_frames(mac):
    decoder, frame = decoder_and_sender(mac)

    (first,) = receive(decoder, frame(filled(1)))
    later = [receive(decoder, frame(filled(byte)))[0] for byte in (2, 3, 4, 5, 6)]

    assert bytes(first.payload) == filled(1)
    assert [bytes(f.payload) for f in later] == [filled(byte) for byte in (2, 3, 4, 5, 6)]


@pytest.mark.parametrize("mac", [False, True], ids=["plain", "mac"])
def test_a_buffer_nothing_refers_to_is_reused_for_the_next_large_frame(mac):
    decoder, frame = decoder_and_sender(mac)
    (first,) = receive(decoder, frame(filled(1)))
    buffer_id = id(first.payload.obj)  # (not the object: holding it would keep it in use)
    del first

    (second,) = receive(decoder, frame(filled(2)))

    assert id(second.payload.obj) == buffer_id  # the same buffer, still alive among the spares
    assert bytes(second.payload) == filled(2)


def test_a_reused_buffer_shows_a_smaller_frame_exactly():
    decoder, frame = decoder_and_sender(False)
    (first,) = receive(decoder, frame(filled(1)))
    buffer_id = id(first.payload.obj)
    del first

    (smaller,) = receive(decoder, frame(filled(2, SIZE - 1000)))

    assert id(smaller.payload.obj) == buffer_id
    assert len(smaller.payload) == SIZE - 1000 and bytes(smaller.payload) == filled(2, SIZE - 1000)


def test_a_buffer_much_larger_than_the_frame_is_not_used_for_it():
    # A view kept of a small frame would keep a much larger buffer alive.
    decoder, frame = decoder_and_sender(False)
    (big,) = receive(decoder, frame(filled(1, 8 * SIZE)))
    big_id = id(big.payload.obj)
    del big

    (small,) = receive(decoder, frame(filled(2)))

    assert id(small.payload.obj) != big_id
    assert bytes(small.payload) == filled(2)


@pytest.mark.parametrize("mac", [False, True], ids=["plain", "mac"])
def test_values_unpickled_from_a_frame_survive_later_frames(mac):
    # bytes and bytearray values are copies; a memoryview value is a view of the frame's buffer
    # (as a NumPy array on an out-of-band buffer would be): that buffer must not be reused.
    decoder, frame = decoder_and_sender(mac)
    values = (filled(1), bytearray(filled(2)), memoryview(filled(3)))

    parts = serialize.dumps_parts(("results", serialize.wrap_buffers(values)))
    (received,) = receive(decoder, frame(parts))
    _, (as_bytes, as_bytearray, as_view) = serialize.loads_parts(wire.split_parts(received))
    del received, parts
    for byte in (7, 8, 9, 10):
        later = serialize.dumps_parts(("results", serialize.wrap_buffers((filled(byte), filled(byte), filled(byte)))))
        (frame_later,) = receive(decoder, frame(later))
        _, got = serialize.loads_parts(wire.split_parts(frame_later))
        assert [bytes(value) for value in got] == [filled(byte)] * 3

    assert (type(as_bytes), type(as_bytearray), type(as_view)) == (bytes, bytearray, memoryview)
    assert as_bytes == filled(1) and as_bytearray == filled(2) and bytes(as_view) == filled(3)


def test_small_payloads_are_copies_not_views_of_the_read_buffer():
    decoder, frame = decoder_and_sender(False)
    stream = b"".join(frame(bytes([index]) * 100) for index in range(200))

    frames = receive(decoder, stream, step=4096)  # frames split across reads, many per read

    assert all(type(f.payload) is bytes for f in frames)
    assert [bytes(f.payload) for f in frames] == [bytes([index]) * 100 for index in range(200)]


def test_spares_are_bounded_and_can_be_let_go():
    decoder, frame = decoder_and_sender(False)
    held = [receive(decoder, frame(filled(byte)))[0] for byte in range(10)]  # all in use at once

    assert decoder.spare_bytes <= wire._SPARES * 2 * SIZE
    del held
    decoder.release_spares()
    assert decoder.spare_bytes == 0
    (after,) = receive(decoder, frame(filled(11)))
    assert bytes(after.payload) == filled(11)


# ------------------------------------------------------------------ over a link


@pytest.fixture
def make_transport():
    """Build Transports of one cluster; all are closed after the test."""
    made = []

    def make(**options) -> Transport:
        made.append(Transport(cluster_id="receive-buffers", secret="s3cret", **options))
        return made[-1]

    yield make
    for transport in made:
        transport.close()


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_payloads_the_receiver_keeps_survive_the_frames_after_them(make_transport, tmp_path, over):
    kept = []
    done = threading.Event()

    def on_frame(conn, frame):
        kept.append(frame.payload)  # large: a view of a reusable buffer; small: bytes
        if len(kept) == 24:
            done.set()

    server = make_transport(info={"uuid": "server"}, on_frame=on_frame)
    target = (server.listen(LOOPBACK, 0) if over == "tcp"
              else server.listen_unix(os.path.join(str(tmp_path), "s.sock")))
    client = make_transport(info={"uuid": "client"})
    conn = client.connect(target).result(WAIT)
    sent = [filled(index, SIZE + index) if index % 2 else bytes([index]) * 50 for index in range(24)]
    for payload in sent:
        conn.send_frame(Kind.MESSAGE, payload)

    assert done.wait(WAIT)
    assert [bytes(payload) for payload in kept] == sent


def test_the_buffers_kept_for_large_frames_are_let_go_when_the_link_goes_quiet(make_transport):
    clock = ManualClock()
    received = []
    server = make_transport(info={"uuid": "server"}, clock=clock,
                            on_frame=lambda conn, frame: received.append(len(frame.payload)))
    server.listen(LOOPBACK, 0)
    client = make_transport(info={"uuid": "client"})
    client.connect(server.address).result(WAIT).send_frame(Kind.MESSAGE, filled(1))
    wait_for(lambda: received == [SIZE], WAIT, "the large frame")
    (inbound,) = server.connections

    assert inbound._decoder.spare_bytes >= SIZE
    clock.advance(connection._SPARES_IDLE + 0.1, server)
    clock.advance(0.1, server)  # a timer set during the first advance runs on this one
    assert inbound._decoder.spare_bytes == 0


# ------------------------------------------------------------------ through an executor


@pytest.fixture
def embedded_executor(tmp_path, monkeypatch):
    import grid

    monkeypatch.delenv("GRID", raising=False)
    monkeypatch.delenv("GRID_SECRET", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    executor = grid.GridExecutor(max_workers=1)
    yield executor
    executor.shutdown(wait=True)


def test_large_results_stay_intact_after_later_results_arrive(embedded_executor):
    values = [filled(1), bytearray(filled(2)), memoryview(filled(3))]

    first = [embedded_executor.submit(helpers.identity, value).result(WAIT * 6) for value in values]
    for byte in range(4, 14):  # frames enough to cycle through every spare buffer, both ways
        later = embedded_executor.submit(helpers.identity, memoryview(filled(byte))).result(WAIT * 6)
        assert bytes(later) == filled(byte)
    mapped = list(embedded_executor.map(helpers.identity, [filled(byte) for byte in range(20, 30)]))

    assert [type(value) for value in first] == [bytes, bytearray, memoryview]
    assert [bytes(value) for value in first] == [filled(1), filled(2), filled(3)]
    assert mapped == [filled(byte) for byte in range(20, 30)]


# ------------------------------------------------------------------ the member lets go of a finished task


class Tracked:
    """A value whose copies in this process are counted while alive."""

    alive: weakref.WeakSet = weakref.WeakSet()

    def __init__(self, size: int):
        self.data = b"x" * size
        Tracked.alive.add(self)

    def __reduce__(self):
        return (Tracked, (len(self.data),))


def make_tracked(size: int) -> Tracked:
    return Tracked(size)


class FakeLink:
    """What a TaskRunner needs of an executor link: an attachment slot, a driver, send_frame."""

    def __init__(self):
        self.attachment = None
        self.driver = types.SimpleNamespace(call_later=lambda delay, fn, *args: None)
        self.sent: list = []  # what went out, still pickled
        self.arrived = threading.Event()

    def send_frame(self, kind, payload, **_):
        self.sent.append([bytes(part) for part in payload] if isinstance(payload, list) else [bytes(payload)])
        self.arrived.set()

    def lend_reading(self):  # no socket: frames are fed in by the test, as by the IO thread
        return False


def test_an_idle_task_thread_holds_nothing_of_its_last_task():
    router = messaging.Router()
    runner = worker.TaskRunner(router, workers=1)
    link = FakeLink()
    try:
        body = ((), [(1, serialize.dumps_function(make_tracked))], [(7, 1, CALL, *pack_arguments((1000,), {}))])
        decoder = wire.FrameDecoder()
        decoder.authenticated()
        (frame,) = decoder.feed(wire.frame_bytes(Kind.MESSAGE, serialize.dumps(("tasks", body))))
        router.on_frame(link, frame)
        assert link.arrived.wait(WAIT)
        # The result went out; the task thread waits for the next task. Its copy of the result
        # (and of the task) must not live on until then.
        wait_for(lambda: not gc.collect() and not list(Tracked.alive), WAIT, "the member's result to be freed")
        ((message_type, results),) = [serialize.loads_parts(parts) for parts in link.sent]
        assert message_type == "results" and [(task_id, status) for task_id, status, *_ in results] == [(7, OK)]
    finally:
        runner.close()


# ------------------------------------------------------------------ pickling: the one-call path


def test_a_main_function_inside_data_still_travels_by_value(monkeypatch):
    pytest.importorskip("cloudpickle")
    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)

    def defined_in_main(x):
        return x + 1

    defined_in_main.__module__ = "__main__"
    defined_in_main.__qualname__ = "defined_in_main"
    main.defined_in_main = defined_in_main

    pickled = serialize.dumps([1, (defined_in_main,)])
    del main.defined_in_main  # by reference, it could not be found any more
    value = serialize.loads(pickled)

    assert value[0] == 1 and value[1][0](1) == 2


def test_data_that_says_main_goes_as_plain_data_with_its_buffers():
    buffers: list = []
    data = ("__main__", serialize.wrap_buffers((filled(5),))[0])

    pickled = serialize.dumps(data, buffers)

    assert len(buffers) == 1
    assert serialize.loads(pickled, [buffer.raw() for buffer in buffers]) == ("__main__", filled(5))


# ------------------------------------------------------------------ large items stream in frames of about one size


def test_large_items_travel_in_frames_near_frame_bytes_both_ways(embedded_executor, monkeypatch):
    """Batching stops at FRAME_BYTES: a map over large items sends them a frame or so apiece and
    gets their results back the same way, so frames have about one size (the receiver reuses its
    buffers) and a member starts on the first item while the next ones travel. It used to batch
    them: map chunks grew to 25 items (a 25 MB frame each way), results to 5 ms' worth."""
    from grid.compute.protocol import FRAME_BYTES

    item = 600_000
    sent, received = [], []
    send_frame = connection.Connection.send_frame

    def recording_send(self, kind, payload=b"", **kwargs):
        parts = payload if isinstance(payload, list) else [payload]
        sent.append(sum(memoryview(part).nbytes for part in parts))
        return send_frame(self, kind, payload, **kwargs)

    finish_large = wire.FrameDecoder._finish_large

    def recording_finish(self):
        received.append(self._length)
        return finish_large(self)

    monkeypatch.setattr(connection.Connection, "send_frame", recording_send)
    monkeypatch.setattr(wire.FrameDecoder, "_finish_large", recording_finish)
    payloads = [filled(byte, item) for byte in range(40)]

    assert list(embedded_executor.map(helpers.identity, payloads)) == payloads

    bound = FRAME_BYTES + item + 4096  # a frame is cut once it holds FRAME_BYTES: one item more at most
    assert sum(sent) >= len(payloads) * item and sum(received) >= len(payloads) * item
    assert max(sent) <= bound, f"a tasks frame of {max(sent)} bytes"
    assert max(received) <= bound, f"a results frame of {max(received)} bytes"
