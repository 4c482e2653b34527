"""Typed messages over authenticated frames, and the table of their handlers.

A MESSAGE or REQUEST frame carries ``(message_type, body)``; a RESPONSE
carries the handler's result, or an error (flag ERROR). A member refuses a
message type nobody registered with an error that names it.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

from ..errors import GridError, RemoteError
from . import serialize
from .wire import ERROR_BIT, MULTIPART_BIT, Kind, split_parts

log = logging.getLogger("grid.messaging")
_REQUEST = Kind.REQUEST  # (looking an enum member up costs more than comparing it)


class UnknownMessage(GridError):
    """A peer sent a message type this member has no handler for."""


class MalformedMessage(GridError):
    """A peer sent a frame that decodes but is not a ``(message type, body)`` message."""


class Router:
    """The table of message handlers: ``handler(conn, body) -> result``.

    A handler runs on the IO thread and must be quick. For a REQUEST it may
    return a ``Future`` or an ``Answer``; the response is sent when it completes.

    Frames normally arrive on the IO thread. A link whose reading is lent to another
    thread (``Connection.lend_reading``) delivers them there: the message is decoded on
    that thread, a handler registered with ``any_thread=True`` runs there too, and any
    other handler is run on the IO thread, in the order the messages came.
    """

    def __init__(self):
        self._handlers: dict[str, object] = {"goodbye": _note_goodbye}
        self._any_thread: set[str] = set()
        self.bad_input = 0  # malformed messages and failed handlers so far (for the log's count)

    def register(self, message_type: str, handler, *, any_thread: bool = False) -> None:
        """Handle ``message_type`` with ``handler``; ``any_thread``: it may run on the thread
        that read the frame (thread-safe, quick, and never user code)."""
        if message_type in self._handlers:
            raise ValueError(f"message type {message_type!r} already has a handler")
        self._handlers[message_type] = handler
        if any_thread:
            self._any_thread.add(message_type)

    def on_frame(self, conn, frame) -> None:
        """The transport's ``on_frame``: decode, look up, run, answer.

        Every REQUEST is answered: with the handler's result, or an error naming what was
        wrong (unknown type, malformed message, the handler's exception). A frame that
        cannot be decoded at all closes the link, after a goodbye that says why.
        """
        try:
            if frame.flags & MULTIPART_BIT:
                message = serialize.loads_parts(split_parts(frame))
            else:
                message = serialize.loads(frame.payload)
        except Exception as exc:  # an authenticated peer sent something undecodable
            # What it asked for is unknown, so nobody could be answered: close the link, and
            # the other side fails (or retries elsewhere) what it had outstanding on it.
            reason = f"undecodable {frame.kind.name} frame: {type(exc).__name__}: {exc}"
            log.warning("closing %r: %s", conn, reason)
            close_with_goodbye(conn, reason)
            return
        if type(message) is not tuple or len(message) != 2 or type(message[0]) is not str:
            self._refuse(conn, frame, MalformedMessage(
                f"a {frame.kind.name} frame carries (message type: str, body), not {shorten(message)}"))
            return
        message_type, body = message
        if message_type in self._any_thread:
            self._run(conn, frame, message_type, body)
        else:  # inline when on the IO thread already
            conn.driver.call_soon(self._run, conn, frame, message_type, body)

    def _run(self, conn, frame, message_type: str, body) -> None:
        handler = self._handlers.get(message_type)
        if handler is None:
            self._refuse(conn, frame, UnknownMessage(
                f"unknown message type {message_type!r}; this member handles: {sorted(self._handlers)}"))
            return
        if frame.kind != _REQUEST:
            try:
                handler(conn, body)
            except Exception as exc:  # a malformed body, most likely: nobody to answer, so say so here
                self._failed(conn, message_type, body, exc)
            return
        try:
            result = handler(conn, body)
        except Exception as exc:
            if not isinstance(exc, GridError):  # a grid error is an answer; anything else, a bad body
                self._failed(conn, message_type, body, exc)
            _respond_error(conn, frame.request_id, exc)
            return
        if type(result) is Answer:
            result.attach(conn, frame.request_id)
        elif isinstance(result, Future):
            result.add_done_callback(lambda done: _respond_future(conn, frame.request_id, done))
        else:
            _respond(conn, frame.request_id, result)

    def _refuse(self, conn, frame, error: GridError) -> None:
        self._warn(f"{error} (from {conn!r})")
        if frame.kind == _REQUEST:
            _respond_error(conn, frame.request_id, error)

    def _failed(self, conn, message_type: str, body, exc: Exception) -> None:
        self._warn(f"{message_type!r} from {conn!r} failed: {type(exc).__name__}: {exc} (body: {shorten(body)})")

    def _warn(self, text: str) -> None:
        """Log bad input, every time at first, then every hundredth time with a count."""
        self.bad_input += 1
        if self.bad_input <= 10 or self.bad_input % 100 == 0:
            log.warning("%s [bad input #%d from authenticated peers]", text, self.bad_input)


def call_local(router: Router, message_type: str, body):
    """What ``message_type``'s handler answers ``body`` with, asked in this process (a member's
    own handle asking its member); a Future's result is awaited."""
    handler = router._handlers.get(message_type)
    if handler is None:
        raise UnknownMessage(f"unknown message type {message_type!r}")
    result = handler(None, body)
    return result.result() if isinstance(result, Future) else result


def _note_goodbye(conn, reason) -> None:
    """The peer is about to close this link, and says why (see ``Connection.farewell``)."""
    conn.farewell = str(reason)[:1000]


def _respond(conn, request_id: int, result) -> None:
    try:
        conn.respond(request_id, serialize.dumps(result))
    except GridError as exc:
        log.debug("could not answer request %d on %r: %s", request_id, conn, exc)


def _respond_error(conn, request_id: int, exc: BaseException) -> None:
    try:
        payload = serialize.dumps(exc)
    except Exception:
        payload = serialize.dumps(RemoteError(f"{type(exc).__name__}: {exc}"))
    try:
        conn.respond(request_id, payload, error=True)
    except GridError as send_error:
        log.debug("could not answer request %d on %r: %s", request_id, conn, send_error)


def _respond_future(conn, request_id: int, done: Future) -> None:
    if done.cancelled():
        _respond_error(conn, request_id, GridError("the request was cancelled"))
    elif done.exception() is not None:
        _respond_error(conn, request_id, done.exception())
    else:
        _respond(conn, request_id, done.result())


def response_value(frame, message_type: str = "a request"):
    """A RESPONSE frame's value (the answer to ``message_type``): the handler's result, or its error raised.

    Raises:
        GridError: the response cannot be decoded.
    """
    try:
        if frame.flags & MULTIPART_BIT:
            value = serialize.loads_parts(split_parts(frame))
        else:
            value = serialize.loads(frame.payload)
    except Exception as exc:
        raise GridError(f"undecodable response to {message_type!r}: {exc}") from exc
    if frame.flags & ERROR_BIT:
        raise value if isinstance(value, BaseException) else RemoteError(str(value))
    return value


def close_with_goodbye(conn, reason: str) -> None:
    """Close ``conn`` after a ``goodbye`` saying why, so the peer's error can name the reason."""
    try:
        send(conn, "goodbye", reason)
    except GridError:
        pass
    conn.close(reason)


def shorten(value, limit: int = 100) -> str:
    """``repr(value)`` cut to ``limit`` characters, for logs and errors about a body off the wire
    (whose ``__repr__`` may fail: that is said instead)."""
    try:
        text = repr(value)
    except Exception as exc:  # noqa: BLE001 - a body from the wire may have any __repr__
        text = f"<{type(value).__name__}: repr failed: {exc}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def send(conn, message_type: str, body) -> None:
    """Send a one-way message. Raises ConnectionClosed if the connection is closed."""
    conn.send_frame(Kind.MESSAGE, serialize.dumps((message_type, body)))


def request(conn, message_type: str, body) -> Future:
    """Send a request; the Future resolves to the handler's result or raises its error."""
    result: Future = Future()
    raw = conn.request(serialize.dumps((message_type, body)))

    def decode(done: Future) -> None:
        if not result.set_running_or_notify_cancel():
            return
        error = done.exception()
        if error is not None:
            result.set_exception(error)
            return
        try:
            value = response_value(done.result(), message_type)
        except BaseException as exc:  # noqa: BLE001 - the handler's error, or an undecodable answer
            result.set_exception(exc)
        else:
            result.set_result(value)

    raw.add_done_callback(decode)
    return result


# -- the lean pair: a request's answer without a Future on either side ---------------------------------
# A Future costs about 8 µs to make, wait on and complete (a Condition, a lock, a list of
# callbacks), and a request made of Futures had four of them on its way: as much as the rest of
# a small request's trip through Python. The data ops, which are that small and that many, use
# these instead.

_get_ident = threading.get_ident


class Call:
    """A request's answer, awaited by the thread that made it (``call``).

    ``ready`` turns True once the response frame, or the link's failure, is in. The thread that
    reads the response may be the caller itself (a lent link, ``net/lending.py``): then nothing
    else happens. Read by another thread, ``wake()`` is called, to wake the caller.
    """

    __slots__ = ("ready", "frame", "error", "request_id", "_conn", "_caller", "_wake")

    def __init__(self, wake=None):
        self.ready = False
        self.frame = None
        self.error: BaseException | None = None
        self.request_id = 0
        self._conn = None
        self._caller = _get_ident()
        self._wake = wake

    # (the connection's side: what it does with a pending request)
    def done(self) -> bool:
        return self.ready

    def set_running_or_notify_cancel(self) -> bool:
        return True

    def set_result(self, frame) -> None:
        self.frame = frame
        self.ready = True
        if self._wake is not None and _get_ident() != self._caller:
            self._wake()

    def set_exception(self, error: BaseException) -> None:
        self.error = error
        self.ready = True
        if self._wake is not None and _get_ident() != self._caller:
            self._wake()

    def result(self):
        """The handler's result, or its error raised (only once ``ready``)."""
        if self.error is not None:
            raise self.error
        return response_value(self.frame)

    def abandon(self) -> None:
        """The caller stopped waiting: forget the request (a late answer is dropped)."""
        if self._conn is not None and not self.ready:
            self._conn.forget_request(self.request_id)


def call(conn, message_type: str, body, wake=None) -> Call:
    """Send a request; the returned ``Call`` turns ``ready`` with its answer (see ``Call``).

    Raises:
        SerializationError: the body cannot travel.
    """
    slot = Call(wake)
    slot._conn = conn
    conn.request_into(slot, serialize.dumps((message_type, body)))
    return slot


class Answer:
    """What a handler returns for an answer that comes later, lighter than a Future.

    The handler's side completes it with ``set_result``/``set_exception`` (from any thread, at
    most once); the Router sends it as the response once both that and ``attach`` happened.
    """

    __slots__ = ("_lock", "_state", "_value", "_conn", "_request_id")

    def __init__(self):
        self._lock = threading.Lock()
        self._state = 0  # 0: waiting, 1: a result, 2: an error
        self._value = None
        self._conn = None
        self._request_id = 0

    def done(self) -> bool:
        return self._state != 0

    def set_running_or_notify_cancel(self) -> bool:
        return True  # (an Answer is never cancelled)

    def set_result(self, value) -> None:
        self._complete(1, value)

    def set_exception(self, error: BaseException) -> None:
        self._complete(2, error)

    def _complete(self, state: int, value) -> None:
        with self._lock:
            if self._state:
                return
            self._state, self._value = state, value
            conn = self._conn
        if conn is not None:
            self._send(conn)

    def attach(self, conn, request_id: int) -> None:
        """(The Router) the request this answers; sent now if it is complete already."""
        with self._lock:
            self._conn, self._request_id = conn, request_id
            state = self._state
        if state:
            self._send(conn)

    def _send(self, conn) -> None:
        if self._state == 1:
            _respond(conn, self._request_id, self._value)
        else:
            _respond_error(conn, self._request_id, self._value)
