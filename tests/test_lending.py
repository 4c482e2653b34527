"""Links whose reading is lent to a group of threads (``net.lending``), over real sockets on 127.0.0.1.

The member's task threads read their executor links this way; these tests drive a
``LinkReader`` directly: frames are handled on the waiting threads, in order, and none
is lost when a link is lent while bytes wait on it; a closing link is closed on the IO
thread; TLS links are never lent.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future

import pytest

from grid.errors import ConnectionClosed, GridError
from grid.net import messaging, serialize
from grid.net.lending import LinkReader
from grid.net.wire import Kind
from tests.test_transport import (LOOPBACK, WAIT, Recorder, client, client_events, connect, logs,  # noqa: F401
                                  make_transport, server, server_events)

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


# -- the lean pair: messaging.call on the caller's side, messaging.Answer on the handler's ---------------------


def answering_server(make_transport, handlers: dict):
    router = messaging.Router()
    for name, handler in handlers.items():
        router.register(name, handler)
    opened: queue.Queue = queue.Queue()
    server = make_transport(info={"uuid": "server"}, on_frame=router.on_frame, on_open=opened.put)
    server.listen(LOOPBACK, 0)
    return server, opened


def await_call(reader: LinkReader, call, timeout: float = WAIT):
    """What a data proxy does: read the lent link on this thread until the answer is in."""
    end = time.monotonic() + timeout
    while not call.ready and time.monotonic() < end:
        reader.wait(0.05)
    assert call.ready, "no answer in time"
    return call.result()


def test_a_call_read_on_its_own_thread_is_answered_without_a_signal(make_transport, client):
    server, _ = answering_server(make_transport, {"double": lambda conn, body: body * 2})
    conn = connect(client, server)
    reader = LinkReader()
    signals = []
    try:
        assert reader.lend(conn)
        calls = [messaging.call(conn, "double", n, lambda: signals.append(1)) for n in range(50)]
        assert [await_call(reader, c) for c in calls] == [2 * n for n in range(50)]
        assert signals == [], "the caller read its own answers: nobody needed waking"
        assert conn._pending == {}
    finally:
        reader.stop()
        reader.close()


def test_a_call_answered_on_another_thread_wakes_its_caller(make_transport, client):
    """A link that is not lent (TLS, say) is read by the IO thread: the caller sleeping in the reader's
    wait must be woken, else it sleeps the whole timeout."""
    server, _ = answering_server(make_transport, {"double": lambda conn, body: body * 2})
    conn = connect(client, server)  # (never lent: the IO thread reads the answer)
    reader = LinkReader()
    woken = []
    try:
        call = messaging.call(conn, "double", 21, lambda: (woken.append(threading.current_thread().name),
                                                           reader.signal()))
        assert await_call(reader, call) == 42
        assert len(woken) == 1 and woken[0].startswith("grid-io")
    finally:
        reader.stop()
        reader.close()


def test_a_call_carries_the_handlers_error_and_the_links_failure(make_transport, client):
    def refuse(conn, body):
        raise GridError(f"no {body}")

    server, opened = answering_server(make_transport, {"refuse": refuse, "hold": lambda conn, body: Future()})
    conn = connect(client, server)
    reader = LinkReader()
    try:
        with pytest.raises(GridError, match="no thanks"):
            await_call(reader, messaging.call(conn, "refuse", "thanks", reader.signal))
        held = messaging.call(conn, "hold", None, reader.signal)
        opened.get(timeout=WAIT).close("the server went")
        with pytest.raises(ConnectionClosed):
            await_call(reader, held)
        with pytest.raises(ConnectionClosed):  # (a call on a closed link fails at once, not in a wait)
            messaging.call(conn, "refuse", "more").result()
    finally:
        reader.stop()
        reader.close()


def test_an_abandoned_call_is_forgotten_and_its_late_answer_dropped(make_transport, client, logs):
    held: queue.Queue = queue.Queue()

    def hold(conn, body):
        later = Future()
        held.put(later)
        return later

    server, _ = answering_server(make_transport, {"hold": hold, "double": lambda conn, body: body * 2})
    conn = connect(client, server)
    reader = LinkReader()
    try:
        call = messaging.call(conn, "hold", None, reader.signal)
        later = held.get(timeout=WAIT)
        call.abandon()
        assert conn._pending == {}
        later.set_result("too late")
        assert await_call(reader, messaging.call(conn, "double", 4, reader.signal)) == 8
        assert not call.ready
    finally:
        reader.stop()
        reader.close()
    assert not [record for record in logs.records if record.levelno >= logging.WARNING]


@pytest.mark.parametrize("early", [True, False], ids=["completed-before-the-handler-returns", "completed-later"])
def test_an_answer_is_sent_whether_it_completes_before_or_after_its_handler_returns(make_transport, client, early):
    later: queue.Queue = queue.Queue()

    def handler(conn, body):
        answer = messaging.Answer()
        if early:
            answer.set_result(body + 1)
        else:
            later.put((answer, body))
        return answer

    server, _ = answering_server(make_transport, {"next": handler})
    conn = connect(client, server)
    answers = [messaging.request(conn, "next", n) for n in range(5)]
    if not early:
        for _ in range(5):
            answer, body = later.get(timeout=WAIT)
            completer = threading.Thread(target=answer.set_result, args=(body + 1,))  # (another thread, as an ack's)
            completer.start()
            completer.join(WAIT)
            answer.set_exception(GridError("a second completion is ignored"))
    assert [a.result(WAIT) for a in answers] == [1, 2, 3, 4, 5]


def test_an_answer_carries_an_error(make_transport, client):
    def handler(conn, body):
        answer = messaging.Answer()
        answer.set_exception(GridError(f"refused {body}"))
        return answer

    server, _ = answering_server(make_transport, {"refuse": handler})
    conn = connect(client, server)
    with pytest.raises(GridError, match="refused 7"):
        messaging.request(conn, "refuse", 7).result(WAIT)
