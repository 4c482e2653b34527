"""Typed messages over authenticated frames, and the table of their handlers.

A MESSAGE or REQUEST frame carries ``(message_type, body)``; a RESPONSE
carries the handler's result, or an error (flag ERROR). A member refuses a
message type nobody registered with an error that names it.
"""

from __future__ import annotations

import logging
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
    return a ``Future``; the response is sent when the Future completes.

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
        if isinstance(result, Future):
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
        frame = done.result()
        try:
            if frame.flags & MULTIPART_BIT:
                value = serialize.loads_parts(split_parts(frame))
            else:
                value = serialize.loads(frame.payload)
        except Exception as exc:
            result.set_exception(GridError(f"undecodable response to {message_type!r}: {exc}"))
            return
        if frame.flags & ERROR_BIT:
            result.set_exception(value if isinstance(value, BaseException) else RemoteError(str(value)))
        else:
            result.set_result(value)

    raw.add_done_callback(decode)
    return result
