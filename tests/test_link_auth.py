"""Authenticated links: a relay or an injected frame gets nowhere (issue 9, item 1), the
protocol version, and the limits a link keeps (item 2, 3).

Real members (in-process ``grid.Peer``s) and Transports on 127.0.0.1, a relay made of raw
sockets that forwards bytes and has no secret, and frames written by hand. Every wait is a
condition with a deadline.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

import grid
import tests.test_transport as transport_tests
from grid.errors import HandshakeError
from grid.net import security, wire
from grid.net.security import ServerHandshake
from grid.net.transport import FailureLog
from grid.net.wire import FrameDecoder, Kind, frame_bytes
from tests.conftest import wait_for
from tests.test_transport import (
    CLUSTER,
    LOOPBACK,
    SECRET,
    WAIT,
    ManualClock,
    Marker,
    Recorder,
    raw_authenticated,
    raw_socket,
    read_until_closed,
    settle,
)

logs = transport_tests.logs  # fixtures
make_transport = transport_tests.make_transport

RELAY_SECRET = "relay-test-secret"


# ------------------------------------------------------------------ a relay with no secret


class Relay:
    """Listens on loopback; forwards one connection's bytes to ``target`` and back.

    It sees the handshake go by (it has no secret, so it can only forward it) and, once
    the member has sent WELCOME, writes ``inject`` (raw frame bytes) towards the member,
    as the attacker of issue 9 did.
    """

    def __init__(self, target, inject: bytes = b""):
        self.target = target
        self.inject = inject
        self.listener = socket.create_server((LOOPBACK, 0))
        self.address = self.listener.getsockname()[:2]
        self.welcomed = threading.Event()
        self.injected = threading.Event()
        self._sockets: list[socket.socket] = [self.listener]
        self._threads: list[threading.Thread] = []
        self._start(self._serve)

    def _start(self, fn, *args) -> None:
        thread = threading.Thread(target=fn, args=args, name="relay")
        self._threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        try:
            dialer, _ = self.listener.accept()
        except OSError:
            return
        member = socket.create_connection(self.target, timeout=WAIT)
        dialer.settimeout(WAIT)
        self._sockets += [dialer, member]
        self._start(self._pump, dialer, member, False)
        self._start(self._pump, member, dialer, True)

    def _pump(self, source: socket.socket, sink: socket.socket, from_member: bool) -> None:
        decoder = FrameDecoder()
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
            except OSError:
                break
            if from_member and not self.welcomed.is_set():
                frames = decoder.feed(data)
                while decoder.buffered and not any(frame.kind == Kind.WELCOME for frame in frames):
                    frames += decoder.feed(b"")
                if any(frame.kind == Kind.WELCOME for frame in frames):
                    self.welcomed.set()
                    if self.inject:
                        try:
                            source.sendall(self.inject)  # towards the member, after its WELCOME
                        except OSError:
                            pass
                        self.injected.set()
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(WAIT)
        assert not any(thread.is_alive() for thread in self._threads)


def member_config(**overrides) -> dict:
    return dict({"id": "relay-test", "secret": RELAY_SECRET, "join": "tcp", "members": [], "port": 0,
                 "interface": LOOPBACK, "workers": 1}, **overrides)


@pytest.fixture
def members():
    """Two members (not started: their transports listen and their routers unpickle frames)."""
    made = [grid.Peer(member_config()), grid.Peer(member_config())]
    yield made
    for peer in made:
        peer.close()


@pytest.fixture
def relays():
    made = []

    def make(target, inject=b"") -> Relay:
        relay = Relay(target, inject)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()


def injected_message(marker_path) -> bytes:
    """A MESSAGE whose unpickling makes a directory, framed as before (no MAC) and with a made-up one."""
    payload = pickle.dumps(("hb", Marker(marker_path)), protocol=5)
    return frame_bytes(Kind.MESSAGE, payload)


def test_a_relay_between_two_members_cannot_inject_a_frame(members, relays, tmp_path, logs):
    # The worst case: the dialer is fooled about the address (the victim advertises the
    # relay's, as behind a NAT), so the handshake goes through the relay to the end.
    # The relay injects a frame after WELCOME; the victim must not unpickle it.
    dialer, victim = members
    marker = tmp_path / "unpickled"
    relay = relays(victim.address, inject=injected_message(marker))
    victim.transport.info["address"] = f"{relay.address[0]}:{relay.address[1]}"
    opened = []
    victim.transport.on_open = opened.append

    conn = dialer.transport.connect(relay.address).result(WAIT)

    assert relay.welcomed.wait(WAIT) and relay.injected.wait(WAIT)
    line = logs.wait_for("failed its MAC check")
    assert "MESSAGE frame #0" in line
    wait_for(lambda: opened and not opened[0].is_open, WAIT, "the victim to close the link")
    assert "failed its MAC check" in opened[0].close_reason
    assert not marker.exists()
    wait_for(lambda: not conn.is_open, WAIT, "the dialer's side to close")
    # The payload was live: unpickling it does make the directory.
    pickle.loads(pickle.dumps(Marker(tmp_path / "control")))
    assert (tmp_path / "control").is_dir()


def test_a_dialer_reaching_another_member_through_a_relay_is_refused(members, relays, tmp_path, logs):
    dialer, victim = members
    marker = tmp_path / "unpickled"
    relay = relays(victim.address, inject=injected_message(marker))
    opened = []
    victim.transport.on_open = opened.append

    with pytest.raises(HandshakeError, match="relays the connection"):
        dialer.transport.connect(relay.address).result(WAIT)

    relayed = f"{relay.address[0]}:{relay.address[1]}"
    line = logs.wait_for("relays the connection")
    assert relayed in line and f"{victim.address[0]}:{victim.address[1]}" in line
    assert not relay.welcomed.is_set() and opened == [] and not marker.exists()


def test_a_direct_link_between_members_carries_frame_macs(members):
    dialer, victim = members
    opened = []
    victim.transport.on_open = opened.append

    conn = dialer.transport.connect(victim.address).result(WAIT)

    assert conn.frame_mac is True
    wait_for(lambda: opened, WAIT, "the member to see the link")
    assert opened[0].frame_mac is True


def test_connect_with_the_wrong_expected_uuid_is_refused(members):
    dialer, victim = members

    with pytest.raises(HandshakeError, match="but '.*' answered"):
        dialer.transport.connect(victim.address, expect_uuid="someone-else").result(WAIT)
    conn = dialer.transport.connect(victim.address, expect_uuid=victim.uuid).result(WAIT)
    assert conn.peer_info["uuid"] == victim.uuid


# ------------------------------------------------------------------ frames at the byte level


@pytest.fixture
def unpickling_server(make_transport):
    """A Transport whose on_frame unpickles every frame it is handed, as a member's router does."""
    events = Recorder()

    def on_frame(conn, frame):
        events.frames.put((conn, pickle.loads(frame.payload)))

    server = make_transport(info={"uuid": "server"}, on_frame=on_frame, on_open=events.on_open,
                            on_close=events.on_close)
    server.listen(LOOPBACK, 0)
    server.events = events
    return server


def assert_closed_for(server, sock, logs, pattern="failed its MAC check") -> None:
    read_until_closed(sock)
    sock.close()
    assert server.events.closed_event.wait(WAIT)
    [conn] = server.events.closed
    assert not conn.closed_by_peer  # we closed it, for a reason we logged
    logs.wait_for(pattern)


def sealed(sealer, payload, *, request_id=0, kind=Kind.MESSAGE) -> bytes:
    return wire.seal_frame(sealer, kind, pickle.dumps(payload), request_id=request_id)


def test_sealed_frames_are_delivered_in_order(unpickling_server):
    sock, _, sealer = raw_authenticated(unpickling_server.address)

    sock.sendall(sealed(sealer, "first") + sealed(sealer, "second"))

    assert unpickling_server.events.frames.get(timeout=WAIT)[1] == "first"
    assert unpickling_server.events.frames.get(timeout=WAIT)[1] == "second"
    sock.close()


def test_a_frame_without_a_mac_closes_the_link(unpickling_server, logs, tmp_path):
    sock, _, _ = raw_authenticated(unpickling_server.address)

    sock.sendall(frame_bytes(Kind.MESSAGE, pickle.dumps(Marker(tmp_path / "m"))))

    assert_closed_for(unpickling_server, sock, logs, "failed its MAC check|too short for its 32-byte MAC")
    assert unpickling_server.events.frames.empty() and not (tmp_path / "m").exists()


def test_a_forged_mac_closes_the_link(unpickling_server, logs, tmp_path):
    sock, _, _ = raw_authenticated(unpickling_server.address)
    forger = wire.FrameSealer(os.urandom(32))  # no session key: any key is a guess

    sock.sendall(wire.seal_frame(forger, Kind.MESSAGE, pickle.dumps(Marker(tmp_path / "m"))))

    assert_closed_for(unpickling_server, sock, logs)
    assert unpickling_server.events.frames.empty() and not (tmp_path / "m").exists()


def test_a_replayed_frame_closes_the_link(unpickling_server, logs):
    sock, _, sealer = raw_authenticated(unpickling_server.address)
    frame = sealed(sealer, "once")

    sock.sendall(frame)
    assert unpickling_server.events.frames.get(timeout=WAIT)[1] == "once"
    sock.sendall(frame)

    assert_closed_for(unpickling_server, sock, logs, r"MESSAGE frame #1 failed its MAC check")
    assert unpickling_server.events.frames.empty()


def test_reordered_frames_close_the_link(unpickling_server, logs):
    sock, _, sealer = raw_authenticated(unpickling_server.address)
    first, second = sealed(sealer, "first"), sealed(sealer, "second")

    sock.sendall(second + first)

    assert_closed_for(unpickling_server, sock, logs, r"frame #0 failed its MAC check")
    assert unpickling_server.events.frames.empty()


@pytest.mark.parametrize("where", ["payload", "request id", "flags", "mac"])
def test_an_altered_frame_closes_the_link(unpickling_server, logs, where):
    sock, _, sealer = raw_authenticated(unpickling_server.address)
    frame = bytearray(sealed(sealer, "intact", request_id=7))
    offset = {"payload": wire.HEADER_SIZE + 3, "request id": 12, "flags": 4, "mac": len(frame) - 1}[where]
    frame[offset] ^= 0x01

    sock.sendall(bytes(frame))

    assert_closed_for(unpickling_server, sock, logs)
    assert unpickling_server.events.frames.empty()


def test_an_altered_large_frame_closes_the_link_before_it_is_handed_up(unpickling_server, logs):
    sock, _, sealer = raw_authenticated(unpickling_server.address)
    frame = bytearray(sealed(sealer, os.urandom(3 * 1024 * 1024)))
    frame[len(frame) // 2] ^= 0x80

    sock.sendall(bytes(frame))

    assert_closed_for(unpickling_server, sock, logs)
    assert unpickling_server.events.frames.empty()


def test_the_client_checks_the_servers_frames_too(make_transport, logs):
    # A hand-written server completes the handshake, then sends a frame with a made-up MAC.
    listener = socket.create_server((LOOPBACK, 0))
    events = Recorder()
    client = make_transport(info={"uuid": "client"}, **events.callbacks())
    future = client.connect(listener.getsockname()[:2])
    sock, _ = listener.accept()
    sock.settimeout(WAIT)
    at = sock.getsockname()
    handshake = ServerHandshake(cluster_id=CLUSTER, secret=SECRET, info={"uuid": "raw-server"},
                                reached_at=f"{at[0]}:{at[1]}")
    decoder = FrameDecoder()
    while not handshake.done:
        for frame in decoder.feed(sock.recv(65536)):
            for kind, payload in handshake.receive(frame.kind, frame.payload):
                sock.sendall(frame_bytes(kind, payload))
    conn = future.result(WAIT)
    assert conn.frame_mac and handshake.frame_mac

    sock.sendall(wire.seal_frame(wire.FrameSealer(handshake.receive_key), Kind.MESSAGE, b"reflected key"))

    wait_for(lambda: not conn.is_open, WAIT, "the client to close the link")
    assert "failed its MAC check" in conn.close_reason
    assert events.frames.empty()
    sock.close()
    listener.close()


def test_frames_both_ways_with_the_mac_multipart_too(make_transport):
    def echo_parts(conn, frame):
        conn.respond(frame.request_id, [b"echo:", *wire.split_parts(frame)])

    server = make_transport(info={"uuid": "server"}, on_frame=echo_parts)
    server.listen(LOOPBACK, 0)
    conn = make_transport(info={"uuid": "client"}).connect(server.address).result(WAIT)
    big = os.urandom(2 * 1024 * 1024)
    sent = [[b"small"], [big], [b"multi", big], [b"", big, b"tail"]]

    answers = [conn.request(parts[0] if len(parts) == 1 else parts) for parts in sent]

    assert conn.frame_mac
    for parts, answer in zip(sent, answers):
        assert [bytes(part) for part in wire.split_parts(answer.result(WAIT))] == [b"echo:", *parts]


# ------------------------------------------------------------------ when the MAC is left off


def test_a_unix_socket_of_our_own_uid_goes_without_the_mac(make_transport, tmp_path):
    events = Recorder(respond=lambda payload: b"echo:" + bytes(payload))
    server = make_transport(info={"uuid": "server"}, **events.callbacks())
    path = server.listen_unix(str(tmp_path / "member.sock"))
    server.listen(LOOPBACK, 0)
    client = make_transport(info={"uuid": "client"})

    over_unix = client.connect(path).result(WAIT)
    over_tcp = client.connect(server.address).result(WAIT)

    assert over_unix.frame_mac is False and over_tcp.frame_mac is True
    assert over_unix.request(b"u").result(WAIT).payload == b"echo:u"
    assert over_tcp.request(b"t").result(WAIT).payload == b"echo:t"
    wait_for(lambda: events.opened.qsize() == 2, WAIT, "both accepted")
    assert sorted(events.opened.get().frame_mac for _ in range(2)) == [False, True]


def test_verified_tls_goes_without_the_mac_unverified_tls_keeps_it(make_transport, tmp_path):
    from tests.test_security import make_pki

    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki", names=("alpha", "beta"))
    echo = Recorder(respond=lambda payload: b"echo:" + bytes(payload))
    verified = make_transport(tls=pki.alpha, info={"uuid": "server"}, **echo.callbacks())
    verified.listen(LOOPBACK, 0)
    conn = make_transport(tls=pki.beta, info={"uuid": "client"}).connect(verified.address).result(WAIT)
    assert conn.frame_mac is False
    assert conn.request(b"x").result(WAIT).payload == b"echo:x"

    unverified_tls = type(pki.alpha)(cert=pki.alpha.cert, key=pki.alpha.key, ca=None)
    unverified = make_transport(tls=unverified_tls, info={"uuid": "server2"}, **echo.callbacks())
    unverified.listen(LOOPBACK, 0)
    conn = make_transport(tls=type(pki.beta)(cert=pki.beta.cert, key=pki.beta.key, ca=None),
                          info={"uuid": "client2"}).connect(unverified.address).result(WAIT)
    assert conn.frame_mac is True
    assert conn.request(b"y").result(WAIT).payload == b"echo:y"


# ------------------------------------------------------------------ the protocol version


def test_a_hello_of_another_protocol_version_is_refused_naming_both(unpickling_server, logs):
    sock = raw_socket(unpickling_server.address)
    hello = {"v": 1, "cluster": CLUSTER, "nonce": "a" * 32, "info": {"uuid": "old"}}

    sock.sendall(frame_bytes(Kind.HELLO, json.dumps(hello).encode()))

    [reply] = [frame for frame in _decode(read_until_closed(sock))]
    sock.close()
    assert reply.kind == Kind.REFUSE
    reason = json.loads(reply.payload)["reason"]
    assert f"speaks grid protocol version 1, this side speaks version {security.PROTOCOL_VERSION}" in reason
    logs.wait_for("protocol version 1, this side speaks version")


def _decode(data: bytes) -> list[wire.Frame]:
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    while decoder.buffered:
        frames += decoder.feed(b"")
    return frames


# ------------------------------------------------------------------ limits


def test_max_frame_bytes_reaches_the_members_transport_and_names_itself(logs):
    with grid.Peer(member_config(max_frame_bytes=10_000)) as peer:
        assert peer.transport.max_payload == 10_000
        sock, _, _ = raw_authenticated(peer.address, secret=peer.secret, cluster_id=peer.config.id)
        sock.sendall(wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.MESSAGE, 0, 0, 10_001 + wire.MAC_SIZE))
        read_until_closed(sock)
        sock.close()
        line = logs.wait_for("exceeds the limit")
    assert "10001 bytes exceeds the limit of 10000 bytes (max_frame_bytes in the config)" in line


def warnings(logs) -> list[str]:
    with logs.changed:
        return [record.getMessage() for record in logs.records if record.levelno >= logging.WARNING]


def test_repeated_failures_before_authentication_are_logged_once_per_source_with_a_count(make_transport, logs):
    clock = ManualClock()
    server = make_transport(clock=clock, failure_log_interval=10.0)
    server.listen(LOOPBACK, 0)

    for _ in range(40):
        sock = raw_socket(server.address)
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        read_until_closed(sock)  # the server has dealt with it
        sock.close()
    settle(server)

    assert sum("bad magic" in line for line in warnings(logs)) == 1
    clock.advance(10.5, server)
    line = logs.wait_for("more connections from")
    assert "39 more connections from 127.0.0.1 failed before authentication in the last 10 s" in line
    assert "bad magic" in line
    # A new interval starts with a line of its own again.
    sock = raw_socket(server.address)
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    read_until_closed(sock)
    sock.close()
    settle(server)
    assert sum("bad magic" in line and "more connections" not in line for line in warnings(logs)) == 2


def test_failures_from_each_source_are_counted_apart_and_sources_are_bounded():
    lines, timers = [], []
    clock = ManualClock()

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("grid.test-failure-log")
    logger.propagate = False
    handler = Collect()
    logger.addHandler(handler)
    try:
        failures = FailureLog(logger, clock, lambda delay, fn: timers.append(fn) or object(),
                                                 interval=5.0, max_sources=3)
        for host in ("10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.1"):
            failures.note((host, 1234), f"refused {host}")
        failures.note("", "refused a Unix one")
        assert lines == ["refused 10.0.0.1", "refused 10.0.0.2", "refused 10.0.0.3", "refused 10.0.0.4"]
        clock.now += 6
        timers.pop()()
        assert sorted(lines[4:]) == [  # 10.0.0.4 was the first of the "other sources": logged, not counted
            ("2 more connections from 10.0.0.1 failed before authentication in the last 5 s "
             "(the last: refused 10.0.0.1)"),
            ("2 more connections from other sources failed before authentication in the last 5 s "
             "(the last: refused a Unix one)"),
        ]
    finally:
        logger.removeHandler(handler)


_EMFILE_CHILD = textwrap.dedent("""
    import json, logging, os, resource, socket, sys, threading, time
    from grid.net.transport import Transport

    lines = []
    class Count(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    logging.getLogger("grid").addHandler(Count())
    logging.getLogger("grid").setLevel(logging.DEBUG)

    server = Transport(cluster_id="c", secret="s", info={"uuid": "server"})
    address = server.listen("127.0.0.1", 0)
    # Use up the descriptors: accept() fails with EMFILE from here on.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 4, hard))
    hog = []
    try:
        while True:
            hog.append(open(os.devnull))
    except OSError:
        pass
    print(json.dumps({"port": address[1]}), flush=True)
    sys.stdin.readline()  # the parent has connected: the backlog is not empty
    cpu, wall = time.process_time(), time.monotonic()
    threading.Event().wait(1.0)  # a window to measure over, not a wait for a condition
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    during = len(lines)
    for file in hog:
        file.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    deadline = time.monotonic() + 10
    while not any("accepting connections again" in line for line in lines) and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    server.close()
    print(json.dumps({"cpu": cpu, "wall": wall, "lines": during, "log": lines[:5],
                      "resumed": any("accepting connections again" in line for line in lines)}), flush=True)
""")


def test_accept_backs_off_when_out_of_file_descriptors():
    child = subprocess.Popen([sys.executable, "-c", _EMFILE_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sockets = []
    try:
        port = json.loads(child.stdout.readline())["port"]
        sockets = [socket.create_connection((LOOPBACK, port), timeout=WAIT) for _ in range(5)]
        child.stdin.write("go\n")
        child.stdin.flush()
        report = json.loads(child.stdout.readline())
    finally:
        for sock in sockets:
            sock.close()
        child.stdin.close()
        child.wait(30)
        child.stdout.close()
    assert report["lines"] <= 3, report["log"]
    assert "cannot accept connections" in report["log"][0] and "ulimit -n" in report["log"][0]
    assert report["cpu"] < 0.3 * report["wall"], report
    assert report["resumed"], report["log"]
