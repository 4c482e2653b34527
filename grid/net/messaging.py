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
from .wire import Flag, Kind, split_parts

log = logging.getLogger("grid.messaging")


class UnknownMessage(GridError):
    """A peer sent a message type this member has no handler for."""


class Router:
    """The table of message handlers: ``handler(conn, body) -> result``.

    A handler runs on the IO thread and must be quick. For a REQUEST it may
    return a ``Future``; the response is sent when the Future completes.
    """

    def __init__(self):
        self._handlers: dict[str, object] = {"goodbye": _note_goodbye}

    def register(self, message_type: str, handler) -> None:
        if message_type in self._handlers:
            raise ValueError(f"message type {message_type!r} already has a handler")
        self._handlers[message_type] = handler

    def on_frame(self, conn, frame) -> None:
        """The transport's ``on_frame``: decode, look up, run, answer."""
        try:
            if frame.flags & Flag.MULTIPART:
                message_type, body = serialize.loads_parts(split_parts(frame))
            else:
                message_type, body = serialize.loads(frame.payload)
        except Exception as exc:  # an authenticated peer sent something undecodable
            # What it asked for is unknown, so nobody could be answered: close the link, and
            # the other side fails (or retries elsewhere) what it had outstanding on it.
            reason = f"undecodable {frame.kind.name} frame: {type(exc).__name__}: {exc}"
            log.warning("closing %r: %s", conn, reason)
            try:
                send(conn, "goodbye", reason)  # so the other side can say why the link closed
            except GridError:
                pass
            conn.close(reason)
            return
        handler = self._handlers.get(message_type)
        if handler is None:
            error = UnknownMessage(
                f"unknown message type {message_type!r}; this member handles: {sorted(self._handlers)}")
            log.warning("%s (from %r)", error, conn)
            if frame.kind == Kind.REQUEST:
                _respond_error(conn, frame.request_id, error)
            return
        if frame.kind != Kind.REQUEST:
            handler(conn, body)
            return
        try:
            result = handler(conn, body)
        except Exception as exc:
            _respond_error(conn, frame.request_id, exc)
            return
        if isinstance(result, Future):
            result.add_done_callback(lambda done: _respond_future(conn, frame.request_id, done))
        else:
            _respond(conn, frame.request_id, result)


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
            if frame.flags & Flag.MULTIPART:
                value = serialize.loads_parts(split_parts(frame))
            else:
                value = serialize.loads(frame.payload)
        except Exception as exc:
            result.set_exception(GridError(f"undecodable response to {message_type!r}: {exc}"))
            return
        if frame.flags & Flag.ERROR:
            result.set_exception(value if isinstance(value, BaseException) else RemoteError(str(value)))
        else:
            result.set_result(value)

    raw.add_done_callback(decode)
    return result
