"""Links whose reading is lent to a group of threads (``net.lending``), over real sockets on 127.0.0.1.

The member's task threads read their executor links this way; these tests drive a
``LinkReader`` directly: frames are handled on the waiting threads, in order, and none
is lost when a link is lent while bytes wait on it; a closing link is closed on the IO
thread; TLS links are never lent.
"""

from __future__ import annotations

import queue
import sys
import threading

import pytest

from grid.net import messaging, serialize
from grid.net.lending import LinkReader
from grid.net.wire import Kind
from tests.test_transport import (LOOPBACK, WAIT, Recorder, client, client_events, connect, make_transport,  # noqa: F401
                                  server, server_events)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="links are lent only with epoll")


class Readers:
    """``count`` threads waiting in one LinkReader, as idle task threads do; closed by the fixture."""

    def __init__(self, count: int):
        self.reader = LinkReader()
        self.threads = [threading.Thread(target=self._wait, name=f"reader-{index}") for index in range(count)]
        for thread in self.threads:
            thread.start()

    def _wait(self) -> None:
        while not self.reader.stopping:
            self.reader.wait()

    def close(self) -> None:
        self.reader.stop()
        for thread in self.threads:
            thread.join(WAIT)
        assert not any(thread.is_alive() for thread in self.threads)
        self.reader.close()


@pytest.fixture
def readers():
    made = []

    def make(count: int = 3) -> Readers:
        made.append(Readers(count))
        return made[-1]

    yield make
    for group in made:
        group.close()


class ThreadRecorder(Recorder):
    """Also records which thread each frame was handled on."""

    def on_frame(self, conn, frame):
        self.frames.put((threading.current_thread().name, bytes(frame.payload)))


def linked(make_transport, client, events):
    """A server recording into ``events``, and ``(the client's connection, the server's side of it)``."""
    server = make_transport(info={"uuid": "server"}, **events.callbacks())
    server.listen(LOOPBACK, 0)
    conn = connect(client, server)
    return conn, events.opened.get(timeout=WAIT)


def test_a_lent_link_is_read_on_the_waiting_threads_in_order(make_transport, client, readers):
    events = ThreadRecorder()
    conn, accepted = linked(make_transport, client, events)
    group = readers()
    assert group.reader.lend(accepted)

    for number in range(300):
        conn.send_frame(Kind.MESSAGE, b"message %d" % number)

    received = [events.frames.get(timeout=WAIT) for _ in range(300)]
    assert [payload for _, payload in received] == [b"message %d" % number for number in range(300)]
    assert {name for name, _ in received} <= {"reader-0", "reader-1", "reader-2"}, "the IO thread read a lent link"


def test_frames_waiting_on_a_link_when_it_is_lent_are_all_read(make_transport, client, readers):
    """The task threads lend a link from inside its first frame's handler, on the IO thread, while
    the next frames may already wait on the socket and threads wait to read them."""
    group = readers(3)
    handled: queue.Queue = queue.Queue()

    def on_frame(conn, frame):
        if bytes(frame.payload) == b"first":
            group.reader.lend(conn)
        handled.put((conn, bytes(frame.payload)))

    server = make_transport(info={"uuid": "server"}, on_frame=on_frame)
    server.listen(LOOPBACK, 0)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as they can: a race shows up if there is one
    try:
        for _ in range(60):
            conn = connect(client, server)
            for payload in (b"first", b"second", b"third"):
                conn.send_frame(Kind.MESSAGE, payload)
            got = [handled.get(timeout=WAIT) for _ in range(3)]
            assert [payload for _, payload in got] == [b"first", b"second", b"third"]
            conn.close()
    finally:
        sys.setswitchinterval(switch)


def test_a_lent_link_that_the_peer_closes_is_closed_on_the_io_thread(make_transport, client, readers):
    events = ThreadRecorder()
    closed_on: queue.Queue = queue.Queue()
    events.on_close = lambda conn: closed_on.put((conn, threading.current_thread().name))
    conn, accepted = linked(make_transport, client, events)
    group = readers(2)
    assert group.reader.lend(accepted)
    conn.send_frame(Kind.MESSAGE, b"before")
    assert events.frames.get(timeout=WAIT)[1] == b"before"

    conn.close()
    closed, thread = closed_on.get(timeout=WAIT)
    assert closed is accepted and thread.startswith("grid-io")
    assert "closed by the peer" in accepted.close_reason
    # The group reads on: a second link lent to it is served.
    more = ThreadRecorder()
    second, accepted = linked(make_transport, client, more)
    assert group.reader.lend(accepted)
    second.send_frame(Kind.MESSAGE, b"after")
    assert more.frames.get(timeout=WAIT)[1] == b"after"


def test_only_handlers_registered_for_any_thread_run_on_the_reading_thread(make_transport, client, readers):
    router = messaging.Router()
    ran: queue.Queue = queue.Queue()
    router.register("quick", lambda conn, body: ran.put(("quick", body, threading.current_thread().name)),
                    any_thread=True)
    router.register("other", lambda conn, body: ran.put(("other", body, threading.current_thread().name)))
    opened: queue.Queue = queue.Queue()
    server = make_transport(info={"uuid": "server"}, on_frame=router.on_frame, on_open=opened.put)
    server.listen(LOOPBACK, 0)
    conn = connect(client, server)
    group = readers(1)
    assert group.reader.lend(opened.get(timeout=WAIT))

    for number in range(20):
        messaging.send(conn, "quick" if number % 2 else "other", number)
    got = [ran.get(timeout=WAIT) for _ in range(20)]

    assert {name for kind, _, name in got if kind == "quick"} == {"reader-0"}
    assert all(name.startswith("grid-io") for kind, _, name in got if kind == "other")
    # Each kind keeps its order (the IO thread's share runs in the order it was read).
    assert [body for kind, body, _ in got if kind == "quick"] == list(range(1, 20, 2))
    assert [body for kind, body, _ in got if kind == "other"] == list(range(0, 20, 2))


def test_a_request_read_by_a_lent_thread_is_answered(make_transport, client, readers):
    router = messaging.Router()
    router.register("double", lambda conn, body: body * 2)
    opened: queue.Queue = queue.Queue()
    server = make_transport(info={"uuid": "server"}, on_frame=router.on_frame, on_open=opened.put)
    server.listen(LOOPBACK, 0)
    conn = connect(client, server)
    group = readers(2)
    assert group.reader.lend(opened.get(timeout=WAIT))
    assert messaging.request(conn, "double", 21).result(WAIT) == 42


def test_links_go_back_to_the_io_thread_when_the_reader_closes(make_transport, client):
    events = ThreadRecorder()
    conn, accepted = linked(make_transport, client, events)
    group = Readers(1)
    assert group.reader.lend(accepted)
    conn.send_frame(Kind.MESSAGE, b"lent")
    assert events.frames.get(timeout=WAIT) == ("reader-0", b"lent")
    group.close()

    conn.send_frame(Kind.MESSAGE, b"back")
    name, payload = events.frames.get(timeout=WAIT)
    assert payload == b"back" and name.startswith("grid-io")


def test_a_tls_link_is_never_lent(make_transport, tmp_path):
    from tests.test_security import make_pki

    pki = make_pki(tmp_path, names=("alpha", "beta"))
    events = ThreadRecorder()
    server = make_transport(tls=pki.alpha, info={"uuid": "server"}, **events.callbacks())
    server.listen(LOOPBACK, 0)
    conn = make_transport(tls=pki.beta, info={"uuid": "tls-client"}).connect(server.address).result(WAIT)
    accepted = events.opened.get(timeout=WAIT)
    group = Readers(1)
    try:
        assert not accepted.can_lend
        assert not group.reader.lend(accepted)
        conn.send_frame(Kind.MESSAGE, serialize.dumps("still read"))
        name, _ = events.frames.get(timeout=WAIT)
        assert name.startswith("grid-io")
    finally:
        group.close()


def test_a_signal_after_close_writes_nowhere(tmp_path):
    """Work queued as a member stops must not write into whatever file took the wake pipe's number."""
    import os

    reader = LinkReader()
    reader.stop()
    reader.close()
    paths = [tmp_path / f"file-{index}" for index in range(4)]
    files = [os.open(path, os.O_RDWR | os.O_CREAT) for path in paths]  # they take the numbers let go of
    try:
        reader.signal()
    finally:
        for fd in files:
            os.close(fd)
    assert [path.stat().st_size for path in paths] == [0, 0, 0, 0]
