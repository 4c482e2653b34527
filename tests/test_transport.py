"""The selectors transport over real sockets on 127.0.0.1: handshake, frames, bad input, TLS.

Every wait is on a condition with a deadline (a Future, an Event, a log record);
every Transport is closed by the fixture, which then checks no IO thread is left.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import queue
import re
import socket
import struct
import threading
import time
import types
from concurrent.futures import CancelledError

import pytest

from grid.net import wire
from grid.errors import ConnectionClosed, HandshakeError, TransportError
from grid.net.security import ClientHandshake
from grid.net.connection import Connection
from grid.net.transport import Transport
from grid.net.wire import HEADER, Flag, FrameDecoder, Kind, frame_bytes, split_parts
from tests.test_security import make_pki  # a throwaway CA (skips when `cryptography` is missing)

SECRET = "s3cret"
CLUSTER = "test-cluster"
LOOPBACK = "127.0.0.1"
WAIT = 5.0  # deadline for things that take milliseconds; only reached when a test fails


# ------------------------------------------------------------------ helpers


class Recorder:
    """Callbacks of one Transport, recorded for the test thread to wait on."""

    def __init__(self, respond=None):
        self.frames: queue.Queue = queue.Queue()
        self.opened: queue.Queue = queue.Queue()
        self.closed: list[Connection] = []
        self.closed_event = threading.Event()
        self.respond = respond  # fn(payload) -> bytes | list: answer REQUESTs with it

    def on_frame(self, conn, frame):
        if frame.kind == Kind.REQUEST and self.respond is not None:
            conn.respond(frame.request_id, self.respond(frame.payload))
            return
        self.frames.put((conn, frame))

    def on_open(self, conn):
        self.opened.put(conn)

    def on_close(self, conn):
        self.closed.append(conn)
        self.closed_event.set()

    def callbacks(self) -> dict:
        return dict(on_frame=self.on_frame, on_open=self.on_open, on_close=self.on_close)


class LogWatch(logging.Handler):
    """Records of the ``grid`` logger, with a wait for one matching a pattern."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.changed = threading.Condition()

    def emit(self, record):
        with self.changed:
            self.records.append(record)
            self.changed.notify_all()

    def messages(self) -> list[str]:
        with self.changed:
            return [record.getMessage() for record in self.records]

    def wait_for(self, pattern: str, timeout: float = WAIT) -> str:
        regex = re.compile(pattern)
        with self.changed:
            found = self.changed.wait_for(
                lambda: any(regex.search(record.getMessage()) for record in self.records), timeout)
        assert found, f"no log line matching {pattern!r} in {self.messages()}"
        return next(message for message in self.messages() if regex.search(message))


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG, logger="grid")
    watch = LogWatch()
    logger = logging.getLogger("grid")
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)


def io_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("grid-io")]


@pytest.fixture
def make_transport():
    """Build Transports that are always closed; then check no IO thread is left."""
    assert io_threads() == [], "an earlier test leaked an IO thread"
    made = []

    def make(*, secret=SECRET, cluster_id=CLUSTER, info=None, **options) -> Transport:
        transport = Transport(cluster_id=cluster_id, secret=secret, info=info or {"uuid": f"t{len(made)}"}, **options)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()
    assert io_threads() == []


@pytest.fixture
def server_events():
    return Recorder(respond=lambda payload: b"echo:" + bytes(payload))


@pytest.fixture
def server(make_transport, server_events):
    transport = make_transport(info={"uuid": "server", "role": "member"}, **server_events.callbacks())
    transport.listen(LOOPBACK, 0)
    return transport


@pytest.fixture
def client_events():
    return Recorder()


@pytest.fixture
def client(make_transport, client_events):
    return make_transport(info={"uuid": "client", "role": "client"}, **client_events.callbacks())


def connect(client: Transport, server: Transport) -> Connection:
    return client.connect(server.address).result(WAIT)


def raw_socket(address) -> socket.socket:
    return socket.create_connection(address, timeout=WAIT)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the other side sends until it closes (a reset counts as a close)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def decode_all(data: bytes) -> list[wire.Frame]:
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    while decoder.buffered:
        more = decoder.feed(b"")
        if not more:
            break
        frames += more
    return frames


def raw_authenticated(address, *, secret=SECRET, cluster_id=CLUSTER) -> tuple[socket.socket, FrameDecoder,
                                                                              wire.FrameSealer]:
    """A blocking socket that did the client handshake by hand: frames at the byte level.

    Returns the socket, the decoder of what the server sends (checking its MACs) and the
    sealer that MACs what the test sends (``wire.seal_frame``), numbered from 0.
    """
    sock = raw_socket(address)
    handshake = ClientHandshake(cluster_id=cluster_id, secret=secret, info={"uuid": "raw"},
                                dialed=f"{sock.getpeername()[0]}:{sock.getpeername()[1]}")
    decoder = FrameDecoder()
    for kind, payload in handshake.start():
        sock.sendall(frame_bytes(kind, payload))
    while not handshake.done:
        frames = decoder.feed(sock.recv(65536))
        for frame in frames:
            for kind, payload in handshake.receive(frame.kind, frame.payload):
                sock.sendall(frame_bytes(kind, payload))
    assert handshake.frame_mac  # TCP: always
    decoder.authenticated(mac_key=handshake.receive_key)
    return sock, decoder, wire.FrameSealer(handshake.send_key)


def assert_still_serving(server: Transport, make_transport) -> None:
    late = make_transport(info={"uuid": "late"})
    conn = late.connect(server.address).result(WAIT)
    assert conn.request(b"still there?").result(WAIT).payload == b"echo:still there?"


def settle(transport: Transport) -> None:
    """Wait until the IO thread has finished the event it is handling now."""
    done = threading.Event()
    transport.call_soon(done.set)
    assert done.wait(WAIT)


class ManualClock:
    """A clock that moves only when the test says so (the loop is woken to notice)."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float, transport: Transport) -> None:
        self.now += seconds
        settle(transport)  # wakes the loop; its timers run after this call ...
        settle(transport)  # ... so they have run once this one is done


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------ connect, handshake, frames


def test_connect_authenticates_and_swaps_info(client, server, server_events):
    conn = connect(client, server)

    accepted = server_events.opened.get(timeout=WAIT)
    assert conn.is_open and accepted.is_open
    assert conn.outbound and not accepted.outbound
    assert conn.peer_info == {"uuid": "server", "role": "member"}
    assert accepted.peer_info == {"uuid": "client", "role": "client"}
    assert conn.remote[1] == server.address[1]
    assert conn in client.connections and accepted in server.connections


def test_on_open_is_called_for_the_outbound_side_too(client, server, client_events):
    conn = connect(client, server)

    assert client_events.opened.get(timeout=WAIT) is conn


def test_request_gets_its_response(client, server):
    conn = connect(client, server)

    response = conn.request(b"ping").result(WAIT)

    assert response.kind == Kind.RESPONSE
    assert response.payload == b"echo:ping"
    assert not response.flags & Flag.ERROR


def test_error_response_carries_the_error_flag(make_transport, client):
    def on_frame(conn, frame):
        conn.respond(frame.request_id, b"it broke", error=True)

    server = make_transport(on_frame=on_frame)
    server.listen(LOOPBACK, 0)
    conn = connect(client, server)

    response = conn.request(b"x").result(WAIT)

    assert response.flags & Flag.ERROR and response.payload == b"it broke"


def test_one_way_frames_reach_on_frame_in_order(client, server, server_events):
    conn = connect(client, server)

    for number in range(200):
        conn.send_frame(Kind.MESSAGE, b"message %d" % number)

    received = [server_events.frames.get(timeout=WAIT) for _ in range(200)]
    assert [frame.payload for _, frame in received] == [b"message %d" % number for number in range(200)]
    assert {frame.kind for _, frame in received} == {Kind.MESSAGE}


def test_server_can_send_right_after_welcome(make_transport, client, client_events):
    # The first MESSAGE often shares a TCP segment with WELCOME: the client must
    # judge it after authentication, not refuse it as "before authentication".
    def on_open(conn):
        conn.send_frame(Kind.MESSAGE, b"welcome aboard" * 500)

    server = make_transport(on_open=on_open, on_frame=lambda conn, frame: None)
    server.listen(LOOPBACK, 0)

    for _ in range(20):
        conn = connect(client, server)
        peer_conn, frame = client_events.frames.get(timeout=WAIT)
        assert peer_conn is conn and frame.payload == b"welcome aboard" * 500
        conn.close()


def test_requests_flow_both_ways(make_transport, server, server_events):
    client = make_transport(on_frame=lambda conn, frame: conn.respond(frame.request_id, b"from client"))
    connect(client, server)
    accepted = server_events.opened.get(timeout=WAIT)

    assert accepted.request(b"hi").result(WAIT).payload == b"from client"


def test_multipart_frames_arrive_as_parts(client, server, server_events):
    conn = connect(client, server)
    parts = [b"header", bytearray(1000), memoryview(b"tail")]

    conn.send_frame(Kind.MESSAGE, parts)

    _, frame = server_events.frames.get(timeout=WAIT)
    assert [bytes(part) for part in split_parts(frame)] == [b"header", bytes(1000), b"tail"]


def test_a_multipart_frame_with_thousands_of_parts_is_sent(client, server, server_events):
    # More buffers than one sendmsg() may take (IOV_MAX is 1024 on Linux).
    conn = connect(client, server)
    parts = [b"%d" % number for number in range(3000)]

    conn.send_frame(Kind.MESSAGE, parts)

    _, frame = server_events.frames.get(timeout=WAIT)
    assert [bytes(part) for part in split_parts(frame)] == parts
    assert conn.is_open


def test_large_payload_round_trips_intact(client, server):
    payload = os.urandom(1024 * 1024) * 8  # 8 MiB: many partial writes each way
    conn = connect(client, server)

    response = conn.request(payload).result(WAIT)

    assert len(response.payload) == len(payload) + 5
    assert hashlib.sha256(response.payload[5:]).digest() == hashlib.sha256(payload).digest()


def test_many_concurrent_requests_from_several_threads(client, server):
    conn = connect(client, server)
    errors = []

    def worker(number):
        try:
            futures = [(index, conn.request(b"%d-%d" % (number, index))) for index in range(100)]
            for index, future in futures:
                assert future.result(WAIT).payload == b"echo:%d-%d" % (number, index)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)

    assert not any(thread.is_alive() for thread in threads)
    assert errors == []


def test_frames_larger_than_max_payload_close_the_connection(make_transport, logs):
    server = make_transport(max_payload=1000, on_frame=lambda conn, frame: None)
    server.listen(LOOPBACK, 0)
    sock, _, _ = raw_authenticated(server.address)

    sock.sendall(HEADER.pack(wire.MAGIC, wire.VERSION, Kind.MESSAGE, 0, 0, 1001 + wire.MAC_SIZE))

    assert read_until_closed(sock) == b""
    assert "exceeds the limit of 1000" in logs.wait_for("exceeds the limit")
    sock.close()


# ------------------------------------------------------------------ refusals


def test_wrong_secret_is_refused_and_logged_on_both_sides(client, make_transport, logs):
    server = make_transport(secret="another secret", on_frame=lambda conn, frame: None)
    server.listen(LOOPBACK, 0)

    with pytest.raises(HandshakeError, match="secrets differ"):
        client.connect(server.address).result(WAIT)

    client_line = logs.wait_for(r"refused \(by this member\).*could not prove the cluster secret")
    server_line = logs.wait_for(r"refused \(by peer\).*could not prove the cluster secret")
    assert "secrets differ" in client_line and "secrets differ" in server_line
    settle(server)
    assert client.connections == [] and server.connections == []


def test_wrong_cluster_id_is_refused(client, make_transport, logs):
    server = make_transport(cluster_id="another-cluster", on_frame=lambda conn, frame: None)
    server.listen(LOOPBACK, 0)

    with pytest.raises(HandshakeError, match="'test-cluster' is not this cluster's 'another-cluster'"):
        client.connect(server.address).result(WAIT)

    logs.wait_for(r"refused \(by this member\).*cluster id 'test-cluster'")
    logs.wait_for(r"refused \(by peer\).*cluster id 'test-cluster'")


def test_refused_connections_call_neither_on_open_nor_on_close(make_transport, server_events):
    server = make_transport(secret="other", **server_events.callbacks())
    server.listen(LOOPBACK, 0)
    client_events = Recorder()
    client = make_transport(**client_events.callbacks())

    with pytest.raises(HandshakeError):
        client.connect(server.address).result(WAIT)
    server.close()
    client.close()

    assert server_events.opened.empty() and client_events.opened.empty()
    assert server_events.closed == [] and client_events.closed == []


def test_silent_peer_is_closed_after_the_handshake_timeout(make_transport, logs):
    server = make_transport(handshake_timeout=0.3)
    server.listen(LOOPBACK, 0)
    sock = raw_socket(server.address)
    started = time.monotonic()

    assert read_until_closed(sock) == b""

    assert time.monotonic() - started >= 0.25
    assert "timed out after 0.3 s" in logs.wait_for("timed out")
    sock.close()


def test_connect_to_a_silent_listener_fails_with_handshake_error(make_transport):
    clock = ManualClock()
    client = make_transport(handshake_timeout=2.0, clock=clock)
    with socket.socket() as mute:  # accepts TCP (backlog) but never speaks
        mute.bind((LOOPBACK, 0))
        mute.listen(1)
        future = client.connect(mute.getsockname())
        settle(client)
        clock.advance(1.9, client)
        assert not future.done()

        clock.advance(0.2, client)

        with pytest.raises(HandshakeError, match="timed out after 2.0 s"):
            future.result(WAIT)


def test_an_open_connection_outlives_the_handshake_timeout(make_transport, server):
    clock = ManualClock()
    client = make_transport(handshake_timeout=1.0, clock=clock)
    conn = connect(client, server)

    clock.advance(60, client)

    assert conn.is_open
    assert conn.request(b"x").result(WAIT).payload == b"echo:x"


BAD_INPUT = {
    "garbage": (b"GET / HTTP/1.1\r\nHost: grid\r\n\r\n", "bad magic"),
    "bad-version": (HEADER.pack(wire.MAGIC, 9, Kind.HELLO, 0, 0, 2) + b"{}", "version 9 is not supported"),
    "unknown-kind": (HEADER.pack(wire.MAGIC, wire.VERSION, 77, 0, 0, 0), "unknown frame kind 77"),
    "oversized-header": (HEADER.pack(wire.MAGIC, wire.VERSION, Kind.HELLO, 0, 0, 10**9), "exceeds the limit of 4096"),
    "message-first": (frame_bytes(Kind.MESSAGE, b"hi"), "MESSAGE frame before authentication"),
    "response-first": (frame_bytes(Kind.RESPONSE, b"hi", request_id=1), "RESPONSE frame before authentication"),
    "proof-first": (frame_bytes(Kind.PROOF, b"x" * 32), "unexpected PROOF"),
    "hello-not-json": (frame_bytes(Kind.HELLO, b"\x00\x01 not json"), "malformed handshake message"),
    "hello-deep-json": (frame_bytes(Kind.HELLO, b"[" * 4000), "malformed handshake message"),
}


@pytest.mark.parametrize("data, reason", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_closes_that_connection_with_a_logged_reason(server, make_transport, logs, data, reason):
    bystander = connect(make_transport(info={"uuid": "bystander"}), server)
    sock = raw_socket(server.address)

    sock.sendall(data)

    read_until_closed(sock)
    sock.close()
    assert reason in logs.wait_for(re.escape(reason))
    assert bystander.is_open
    assert_still_serving(server, make_transport)


def test_truncated_frame_then_close_is_forgotten(server, server_events, make_transport):
    sock = raw_socket(server.address)
    sock.sendall(frame_bytes(Kind.HELLO, b'{"v": 1}')[:-3])
    sock.close()

    assert_still_serving(server, make_transport)
    assert len(server.connections) == 1  # only the good one: the truncated one was dropped
    assert server_events.closed == []  # it was never open


def test_truncated_frame_after_authentication_then_close(server, server_events, make_transport):
    sock, _, sealer = raw_authenticated(server.address)
    accepted = server_events.opened.get(timeout=WAIT)
    sock.sendall(wire.seal_frame(sealer, Kind.MESSAGE, b"cut short")[:-4])
    sock.close()

    assert server_events.closed_event.wait(WAIT)
    assert server_events.closed == [accepted] and accepted.closed_by_peer
    assert server_events.frames.empty()
    assert_still_serving(server, make_transport)


class Marker:
    """Unpickling this creates a directory: the proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize("kind", [Kind.MESSAGE, Kind.REQUEST, Kind.HELLO, Kind.PROOF], ids=lambda kind: kind.name)
def test_nothing_is_unpickled_before_the_handshake(make_transport, tmp_path, logs, kind):
    # Even with a layer above that unpickles every frame it is given.
    unpickled = []
    server = make_transport(on_frame=lambda conn, frame: unpickled.append(pickle.loads(frame.payload)))
    server.listen(LOOPBACK, 0)
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Marker(marker), protocol=5)
    sock = raw_socket(server.address)

    sock.sendall(frame_bytes(kind, payload, request_id=1))
    replies = decode_all(read_until_closed(sock))
    sock.close()

    assert not marker.exists()
    assert unpickled == []
    assert [frame.kind for frame in replies] in ([], [Kind.REFUSE])
    logs.wait_for("before authentication|malformed|unexpected")
    settle(server)
    assert server.connections == []
    # The payload was live: unpickling it does create the marker.
    pickle.loads(pickle.dumps(Marker(tmp_path / "control")))
    assert (tmp_path / "control").is_dir()


def test_write_failure_on_the_io_thread_closes_only_that_connection(make_transport, logs):
    # The server answers from its IO thread into a socket the peer has just reset.
    got_request, peer_reset = threading.Event(), threading.Event()
    events = Recorder()

    def on_frame(conn, frame):
        got_request.set()
        assert peer_reset.wait(WAIT)
        conn.respond(frame.request_id, b"into the void")

    server = make_transport(on_frame=on_frame, on_open=events.on_open, on_close=events.on_close)
    server.listen(LOOPBACK, 0)
    sock, _, sealer = raw_authenticated(server.address)
    sock.sendall(wire.seal_frame(sealer, Kind.REQUEST, b"answer me", request_id=1))
    assert got_request.wait(WAIT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    peer_reset.set()

    assert events.closed_event.wait(WAIT)
    assert "write failed" in events.closed[0].close_reason
    logs.wait_for("error handling a REQUEST frame")  # respond() raised ConnectionClosed into on_frame
    other = make_transport(on_frame=lambda conn, frame: None)
    assert connect(other, server).is_open


# ------------------------------------------------------------------ closing


def test_closing_the_peer_fails_pending_requests(make_transport, client, client_events):
    server_events = Recorder()  # records REQUESTs, never answers
    server = make_transport(**server_events.callbacks())
    server.listen(LOOPBACK, 0)
    conn = connect(client, server)
    pending = [conn.request(b"never answered %d" % number) for number in range(3)]
    server_events.frames.get(timeout=WAIT)
    accepted = server_events.opened.get(timeout=WAIT)

    accepted.close("test is done with it")

    for future in pending:
        with pytest.raises(ConnectionClosed, match="request not answered") as error:
            future.result(WAIT)
        assert error.value.by_peer
    assert client_events.closed_event.wait(WAIT)
    assert conn.closed_by_peer and not conn.is_open
    assert accepted.close_reason == "test is done with it" and not accepted.closed_by_peer


def test_closing_our_side_fails_pending_requests_as_ours(make_transport, client):
    server = make_transport(on_frame=lambda conn, frame: None)
    server.listen(LOOPBACK, 0)
    conn = connect(client, server)
    future = conn.request(b"x")

    conn.close("changed my mind")

    with pytest.raises(ConnectionClosed, match="changed my mind") as error:
        future.result(WAIT)
    assert error.value.by_peer is False


def test_send_and_request_after_close_fail_at_once(client, server, client_events):
    conn = connect(client, server)
    conn.close()
    assert client_events.closed_event.wait(WAIT)

    with pytest.raises(ConnectionClosed, match="closed"):
        conn.send_frame(Kind.MESSAGE, b"late")
    with pytest.raises(ConnectionClosed):
        conn.request(b"late").result(0)


def test_on_close_is_called_once_on_each_side(client, server, client_events, server_events):
    conn = connect(client, server)
    accepted = server_events.opened.get(timeout=WAIT)

    conn.close()
    conn.close()
    assert client_events.closed_event.wait(WAIT)
    assert server_events.closed_event.wait(WAIT)
    client.close()
    server.close()

    assert client_events.closed == [conn]
    assert server_events.closed == [accepted]
    assert conn.close_reason == "closed by this side"
    assert accepted.closed_by_peer


def test_transport_close_closes_connections_and_calls_on_close(client, server, client_events, server_events):
    conn = connect(client, server)
    future = conn.request(b"x")
    future.result(WAIT)

    client.close()

    assert client_events.closed == [conn] and not conn.is_open
    assert conn.close_reason == "transport closed"
    assert server_events.closed_event.wait(WAIT)


def test_close_joins_the_io_thread_and_is_idempotent(make_transport):
    transport = make_transport(name="grid-io-close-test")
    transport.listen(LOOPBACK, 0)
    assert any(thread.name == "grid-io-close-test" for thread in io_threads())

    transport.close()
    transport.close()

    assert not any(thread.name == "grid-io-close-test" for thread in io_threads())


def test_connect_after_close_fails_instead_of_hanging(make_transport, server):
    client = make_transport()
    client.close()

    with pytest.raises(TransportError, match="closed"):
        client.connect(server.address).result(WAIT)


def test_close_from_the_io_thread_is_refused(make_transport):
    transport = make_transport()
    result = []
    done = threading.Event()

    def try_close():
        try:
            transport.close()
        except RuntimeError as exc:
            result.append(exc)
        done.set()

    transport.call_soon(try_close)

    assert done.wait(WAIT)
    assert "own IO thread" in str(result[0])


def test_cancelled_connect_closes_quietly(client, server, server_events, client_events, logs):
    hold = threading.Event()
    server.call_soon(hold.wait, WAIT)  # the server's IO thread waits: the handshake cannot finish yet
    future = client.connect(server.address)

    assert future.cancel()
    hold.set()

    assert server_events.closed_event.wait(WAIT)  # the client hung up once authenticated
    with pytest.raises(CancelledError):
        future.result(0)
    client.close()
    assert client_events.opened.empty() and client_events.closed == []
    assert not [record for record in logs.records if record.levelno >= logging.ERROR]


def test_a_cancelled_request_is_forgotten_and_its_late_response_ignored(make_transport, client, logs):
    held = queue.Queue()

    def on_frame(conn, frame):
        if frame.payload == b"slow":
            held.put((conn, frame.request_id))
        else:
            conn.respond(frame.request_id, b"fast")

    server = make_transport(on_frame=on_frame)
    server.listen(LOOPBACK, 0)
    conn = connect(client, server)
    future = conn.request(b"slow")
    accepted, request_id = held.get(timeout=WAIT)

    assert future.cancel()
    assert conn._pending == {}  # a caller that gives up does not leak its entry
    accepted.respond(request_id, b"too late")

    assert conn.request(b"next").result(WAIT).payload == b"fast"
    assert future.cancelled()
    assert not [record for record in logs.records if record.levelno >= logging.ERROR]


# ------------------------------------------------------------------ the loop: call_soon, call_later


def test_call_soon_runs_on_the_io_thread_in_order(make_transport):
    transport = make_transport(name="grid-io-calls")
    seen = []
    done = threading.Event()

    for number in range(5):
        transport.call_soon(lambda number=number: seen.append((number, threading.current_thread().name)))
    transport.call_soon(done.set)

    assert done.wait(WAIT)
    assert seen == [(number, "grid-io-calls") for number in range(5)]


def test_call_soon_on_the_io_thread_runs_inline(make_transport):
    transport = make_transport()
    order = []
    done = threading.Event()

    def outer():
        transport.call_soon(order.append, "inner")
        order.append("after inner")
        done.set()

    transport.call_soon(outer)

    assert done.wait(WAIT)
    assert order == ["inner", "after inner"]


def test_call_later_runs_timers_in_deadline_order_and_cancel_skips(make_transport):
    transport = make_transport()
    ran = []
    done = threading.Event()

    transport.call_later(0.03, ran.append, "third")
    transport.call_later(0.01, ran.append, "first")
    cancelled = transport.call_later(0.02, ran.append, "cancelled")
    transport.call_later(0.02, ran.append, "second")
    transport.call_later(0.05, done.set)
    cancelled.cancel()

    assert done.wait(WAIT)
    assert ran == ["first", "second", "third"]


def test_call_later_with_equal_deadlines_runs_in_call_order(make_transport):
    clock = types.SimpleNamespace(monotonic=lambda: 100.0)  # frozen: every timer gets the same deadline
    transport = make_transport(clock=clock)
    ran = []
    done = threading.Event()

    for number in range(20):
        transport.call_later(0, ran.append, number)
    transport.call_later(0, done.set)

    assert done.wait(WAIT)
    assert ran == list(range(20))


def test_an_exception_in_a_callback_is_logged_and_the_loop_goes_on(make_transport, logs):
    transport = make_transport()
    done = threading.Event()

    transport.call_soon(lambda: 1 / 0)
    transport.call_later(0, lambda: [][1])
    transport.call_later(0.01, done.set)

    assert done.wait(WAIT)
    logs.wait_for("error in a call on the IO thread")
    logs.wait_for("error in a timer on the IO thread")


# ------------------------------------------------------------------ connect and listen errors


def test_connect_to_a_closed_port_fails_quickly_with_transport_error(client):
    started = time.monotonic()

    with pytest.raises(TransportError, match="cannot connect") as error:
        client.connect((LOOPBACK, free_port())).result(WAIT)

    assert not isinstance(error.value, HandshakeError)
    assert time.monotonic() - started < 2
    assert client.connections == []


def test_listen_moves_up_when_the_port_is_taken(make_transport):
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        if port > 65000:
            pytest.skip("no room above the port the OS chose")
        transport = make_transport()

        host, bound = transport.listen(LOOPBACK, port)

    assert host == LOOPBACK and port < bound <= port + 100
    assert transport.address == (LOOPBACK, bound)


def test_listen_fails_when_the_whole_range_is_taken(make_transport):
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen(1)
        port = taken.getsockname()[1]

        with pytest.raises(TransportError, match=f"cannot listen on {LOOPBACK} ports {port}..{port}"):
            make_transport().listen(LOOPBACK, port, port_range=1)


def test_listen_on_port_zero_lets_the_os_choose(make_transport):
    host, port = make_transport().listen(LOOPBACK, 0)

    assert host == LOOPBACK and port > 0


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), names=("alpha", "beta"))


@pytest.fixture
def tls_server(make_transport, pki, server_events):
    transport = make_transport(tls=pki.alpha, info={"uuid": "server"}, **server_events.callbacks())
    transport.listen(LOOPBACK, 0)
    return transport


def test_tls_pair_authenticates_and_exchanges_frames(make_transport, pki, tls_server, server_events):
    client = make_transport(tls=pki.beta, info={"uuid": "tls-client"})

    conn = connect(client, tls_server)

    assert conn.peer_info["uuid"] == "server"
    assert conn.request(b"over tls").result(WAIT).payload == b"echo:over tls"
    conn.send_frame(Kind.MESSAGE, [b"multi", b"part"])
    _, frame = server_events.frames.get(timeout=WAIT)
    assert [bytes(part) for part in split_parts(frame)] == [b"multi", b"part"]
    assert conn._sock.version() is not None  # it is really TLS


def test_tls_large_payload_and_concurrent_requests(make_transport, pki, tls_server):
    client = make_transport(tls=pki.beta)
    conn = connect(client, tls_server)
    payload = os.urandom(1024 * 1024) * 4
    errors = []

    def chatter(number):
        try:
            for index in range(30):
                assert conn.request(b"%d:%d" % (number, index)).result(WAIT).payload == b"echo:%d:%d" % (number, index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=chatter, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    response = conn.request(payload).result(WAIT)
    for thread in threads:
        thread.join(WAIT)

    assert errors == []
    assert hashlib.sha256(response.payload[5:]).digest() == hashlib.sha256(payload).digest()


def test_tls_client_with_a_certificate_from_another_ca_is_refused(make_transport, tmp_path, pki, tls_server, logs):
    stranger = make_pki(tmp_path, names=("stranger",)).stranger
    client = make_transport(tls=stranger)

    with pytest.raises((TransportError, HandshakeError)):
        client.connect(tls_server.address).result(WAIT)

    logs.wait_for("TLS handshake failed")
    good = make_transport(tls=pki.beta)
    assert connect(good, tls_server).request(b"ok?").result(WAIT).payload == b"echo:ok?"


def test_plain_client_to_a_tls_server_is_refused(make_transport, tls_server):
    client = make_transport()

    with pytest.raises((TransportError, HandshakeError)):
        client.connect(tls_server.address).result(WAIT)


def test_tls_client_to_a_plain_server_is_refused(make_transport, pki, server):
    client = make_transport(tls=pki.beta)

    with pytest.raises((TransportError, HandshakeError)):
        client.connect(server.address).result(WAIT)


def test_tls_server_closes_a_silent_peer_after_the_handshake_timeout(make_transport, pki):
    clock = ManualClock()
    server = make_transport(tls=pki.alpha, handshake_timeout=1.0, clock=clock)
    server.listen(LOOPBACK, 0)
    sock = raw_socket(server.address)
    deadline = time.monotonic() + WAIT
    while not server.connections:  # until the IO thread has accepted it
        assert time.monotonic() < deadline
        settle(server)

    clock.advance(1.0, server)

    assert read_until_closed(sock) == b""
    sock.close()


def test_grid_config_tls_section_works_end_to_end(make_transport, pki):
    from grid.cluster.config_tables import TlsConfig

    server = make_transport(tls=TlsConfig(cert=pki.alpha.cert, key=pki.alpha.key, ca=pki.ca),
                            on_frame=lambda conn, frame: conn.respond(frame.request_id, b"ok"))
    server.listen(LOOPBACK, 0)
    client = make_transport(tls=TlsConfig(cert=pki.beta.cert, key=pki.beta.key, ca=pki.ca))

    assert connect(client, server).request(b"?").result(WAIT).payload == b"ok"
