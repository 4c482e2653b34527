"""The selectors loop: the only code in grid that touches sockets.

::

    caller threads                          IO thread ("grid-io", one per Transport)
    --------------                          ----------------------------------------
    conn.send_frame() --sendmsg()--> socket     (directly, when nothing is queued)
         `-- what did not fit --> conn._out --wake--> EVENT_WRITE -> flush
    transport.connect(addr) -> Future ------> non-blocking connect -> TLS -> handshake
    conn.request(payload) -> Future             readable -> FrameDecoder.feed()
                                                  handshake frames -> security.*Handshake
                                                  RESPONSE frames  -> the request's Future
                                                  other frames     -> on_frame(conn, frame)
                                                closed -> on_close(conn)

Nothing but handshake frames is accepted before authentication, and the
decoder caps them at 4 KiB. Every ``OSError`` is translated at this edge into
grid's ``TransportError``/``ConnectionClosed``, saying whether we or the peer
closed the connection.
"""

from __future__ import annotations

import collections
import enum
import errno
import heapq
import itertools
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from concurrent.futures import Future, InvalidStateError

from . import security, wire
from .errors import ConnectionClosed, HandshakeError, ProtocolError, TransportError
from .wire import Flag, Kind

log = logging.getLogger("grid.transport")

_RECV_SIZE = 256 * 1024
_ACCEPT_BACKLOG = 512
_IOV_BATCH = 512  # buffers per sendmsg(); Linux refuses more than IOV_MAX (1024) with EMSGSIZE
_TLS_WRITE_SIZE = 256 * 1024  # bytes per SSL write; a retry after WANT_WRITE resends the same prefix


class State(enum.Enum):
    CONNECTING = "connecting"
    TLS = "tls"
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


_TRANSITIONS = {
    State.CONNECTING: {State.TLS, State.HANDSHAKE, State.CLOSED},
    State.TLS: {State.HANDSHAKE, State.CLOSED},
    State.HANDSHAKE: {State.OPEN, State.CLOSED},
    State.OPEN: {State.CLOSED},
    State.CLOSED: set(),
}


class Connection:
    """One authenticated (or authenticating) connection to another process."""

    def __init__(self, transport: Transport, sock: socket.socket, *, outbound: bool, remote: tuple):
        self.transport = transport
        self.outbound = outbound
        self.remote = remote
        self.state = State.CONNECTING
        self.peer_info: dict = {}
        self.close_reason: str | None = None
        self.closed_by_peer = False
        self.opened = Future()  # resolves to self once authenticated
        self.attachment = None  # free slot for the layer above (e.g. the member this link belongs to)
        self.farewell: str | None = None  # why the peer said it closes this link, if it said
        self._sock = sock
        self._lock = threading.Lock()
        self._out: collections.deque = collections.deque()
        self._decoder = wire.FrameDecoder()
        self._handshake = None
        self._pending: dict[int, Future] = {}
        self._request_ids = itertools.count(1)
        self._deadline_timer = None
        self._events = 0
        self._announced = False  # on_open was called, so on_close will be

    def __repr__(self) -> str:
        who = self.peer_info.get("address") or _where(self.remote)
        return f"<Connection {'to' if self.outbound else 'from'} {who} {self.state.value}>"

    @property
    def is_open(self) -> bool:
        return self.state is State.OPEN

    def _set_state(self, new: State) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"connection state {self.state.value} cannot go to {new.value}")
        self.state = new

    # -- sending (any thread) ------------------------------------------------------------

    def send_frame(self, kind: Kind, payload=b"", *, request_id: int = 0, flags: int = 0) -> None:
        """Queue one frame; writes at once from the calling thread when nothing is queued.

        Raises:
            ConnectionClosed: the connection is closed (or failed while writing).
        """
        buffers = wire.encode_frame(kind, payload, request_id=request_id, flags=flags)
        self._send_buffers(buffers)

    def _send_buffers(self, buffers: list) -> None:
        failure = None
        with self._lock:
            if self.state is State.CLOSED:
                raise ConnectionClosed(f"{self!r} is closed: {self.close_reason}", by_peer=self.closed_by_peer)
            if self._out or self.state is not State.OPEN and self.state is not State.HANDSHAKE:
                self._out.extend(memoryview(b).cast("B") for b in buffers)
                queued_first = len(self._out) == len(buffers)
            else:
                try:
                    sent = self._write(buffers)
                except OSError as exc:
                    failure = exc
                else:
                    self._queue_remainder(buffers, sent)
                    queued_first = bool(self._out)
        if failure is not None:
            # Not inline: on the IO thread (a reply from on_frame) _fail would run in
            # the middle of _read, and it takes self._lock, which we held just now.
            self.transport._defer(self._fail, f"write failed: {failure}", True)
            raise ConnectionClosed(f"{self!r}: write failed: {failure}", by_peer=True) from failure
        if queued_first and self.state in (State.OPEN, State.HANDSHAKE):
            self.transport.call_soon(self._update_interest)

    def _write(self, buffers) -> int:
        """Write from the start of ``buffers`` (a list or the queue); return the bytes sent."""
        try:
            if isinstance(self._sock, ssl.SSLSocket):
                # An SSL write is all or nothing, and after WANT_WRITE it must be retried
                # with the same leading bytes: always offer the first _TLS_WRITE_SIZE queued.
                return self._sock.send(_leading_bytes(buffers, _TLS_WRITE_SIZE))
            return self._sock.sendmsg(list(itertools.islice(buffers, _IOV_BATCH)))
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0

    def _queue_remainder(self, buffers, sent: int) -> None:
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            if sent >= view.nbytes:
                sent -= view.nbytes
                continue
            self._out.append(view[sent:])
            sent = 0

    def _flush(self) -> None:
        """IO thread: write what is queued."""
        with self._lock:
            while self._out:
                sent = self._write(self._out)
                if sent == 0:
                    break
                while sent and self._out:
                    head = self._out[0]
                    if sent >= head.nbytes:
                        sent -= head.nbytes
                        self._out.popleft()
                    else:
                        self._out[0] = head[sent:]
                        sent = 0
        self._update_interest()

    def request(self, payload, *, flags: int = 0) -> Future:
        """Send a REQUEST frame; the Future resolves to the RESPONSE ``Frame``.

        The Future fails with ConnectionClosed if the connection closes first.
        """
        future: Future = Future()
        with self._lock:
            request_id = next(self._request_ids)
            self._pending[request_id] = future

        def forget_if_cancelled(done: Future) -> None:  # a caller that gives up must not leak its entry
            if done.cancelled():
                with self._lock:
                    self._pending.pop(request_id, None)

        future.add_done_callback(forget_if_cancelled)
        try:
            self.send_frame(Kind.REQUEST, payload, request_id=request_id, flags=flags)
        except ConnectionClosed as exc:
            with self._lock:
                self._pending.pop(request_id, None)
            future.set_exception(exc)
        return future

    def respond(self, request_id: int, payload, *, error: bool = False) -> None:
        """Answer the REQUEST ``request_id``; ``error`` marks the payload as a failure.

        Raises:
            ConnectionClosed: the connection is closed (or failed while writing).
        """
        self.send_frame(Kind.RESPONSE, payload, request_id=request_id, flags=Flag.ERROR if error else 0)

    def close(self, reason: str = "closed by this side") -> None:
        """Close from any thread; queued output is dropped."""
        self.transport.call_soon(self._fail, reason, False)

    # -- IO thread ------------------------------------------------------------------------

    def _update_interest(self) -> None:
        if self.state is State.CLOSED:
            return
        events = selectors.EVENT_READ
        if self.state is State.CONNECTING or (self._out and self.state is State.OPEN) or self._out and self.state is State.HANDSHAKE:
            events |= selectors.EVENT_WRITE
        if self.state is State.CONNECTING:
            events = selectors.EVENT_WRITE
        if events != self._events:
            self.transport._selector.modify(self._sock, events, self._on_event)
            self._events = events

    def _on_event(self, mask: int) -> None:
        try:
            if self.state is State.CONNECTING:
                self._finish_connect()
            elif self.state is State.TLS:
                self._continue_tls()
            else:
                if mask & selectors.EVENT_WRITE:
                    self._flush()
                if mask & selectors.EVENT_READ:
                    self._read()
        except ProtocolError as exc:
            log.warning("closing %r: protocol error: %s", self, exc)
            self._fail(f"protocol error: {exc}", False)
        except (ConnectionClosed, OSError) as exc:
            self._fail(str(exc) or type(exc).__name__, True)
        except Exception as exc:  # a bug here must cost one connection, not the loop's attention
            log.exception("closing %r after an unexpected error", self)
            self._fail(f"internal error: {exc!r}", False)

    def _finish_connect(self) -> None:
        error = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            reason = f"cannot connect to {_where(self.remote)}: {errno.errorcode.get(error, error)} ({os.strerror(error)})"
            self._fail(reason, True)
            return
        context = self.transport._client_tls
        if context is not None:
            self._set_state(State.TLS)
            self._sock = context.wrap_socket(self._sock, do_handshake_on_connect=False)
            self.transport._selector.modify(self._sock, selectors.EVENT_WRITE | selectors.EVENT_READ, self._on_event)
            self._continue_tls()
            return
        self._begin_handshake()

    def _continue_tls(self) -> None:
        try:
            self._sock.do_handshake()
        except ssl.SSLWantReadError:
            self._events = selectors.EVENT_READ
            self.transport._selector.modify(self._sock, self._events, self._on_event)
            return
        except ssl.SSLWantWriteError:
            self._events = selectors.EVENT_WRITE
            self.transport._selector.modify(self._sock, self._events, self._on_event)
            return
        except (ssl.SSLError, OSError) as exc:
            log.warning("TLS handshake with %s failed: %s", _where(self.remote), exc)
            self._fail(f"TLS handshake failed: {exc}", True)
            return
        self._begin_handshake()

    def _begin_handshake(self) -> None:
        transport = self.transport
        self._set_state(State.HANDSHAKE)
        options = dict(cluster_id=transport.cluster_id, secret=transport._secret, info=transport.info)
        self._handshake = security.ClientHandshake(**options) if self.outbound else security.ServerHandshake(**options)
        self._update_interest()
        for kind, payload in self._handshake.start():
            self.send_frame(kind, payload)

    def _read(self) -> None:
        target = self._decoder.receive_buffer()
        if target is not None and not isinstance(self._sock, ssl.SSLSocket):
            frames = self._decoder.received_into(self._receive_into(target))  # a large payload, in place
        else:
            data = self._receive()
            if not data:
                return
            frames = self._decoder.feed(data)
        while frames:
            for frame in frames:
                if self.state is State.CLOSED:
                    return
                self._handle(frame)
            # During the handshake the decoder hands out one frame at a time, so that
            # what follows WELCOME is judged by the authenticated decoder: go on.
            frames = self._decoder.feed(b"") if self._decoder.buffered and self.state is not State.CLOSED else []

    def _receive_into(self, target: memoryview) -> int:
        try:
            count = self._sock.recv_into(target)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise ConnectionClosed(f"connection lost: {exc}") from exc
        finally:
            target.release()
        if not count:
            raise ConnectionClosed("closed by the peer")
        return count

    def _receive(self) -> bytes:
        """Bytes from the socket; b"" when there is nothing yet. Raises ConnectionClosed."""
        if not isinstance(self._sock, ssl.SSLSocket):
            try:
                data = self._sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return b""
            except OSError as exc:
                raise ConnectionClosed(f"connection lost: {exc}") from exc
            if not data:
                raise ConnectionClosed("closed by the peer")
            return data
        # SSL_read gives one record (16 KiB) per call; read until it would block. Under
        # the lock: an SSL object must not read here while a caller thread writes to it.
        chunks = []
        size = 0
        with self._lock:
            while size < _RECV_SIZE and self.state is not State.CLOSED:
                try:
                    chunk = self._sock.recv(_RECV_SIZE - size)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    break
                except OSError as exc:
                    raise ConnectionClosed(f"connection lost: {exc}") from exc
                if not chunk:
                    if chunks:
                        break  # deliver what came first; the close is seen on the next read
                    raise ConnectionClosed("closed by the peer")
                chunks.append(chunk)
                size += len(chunk)
        return b"".join(chunks)

    def _handle(self, frame: wire.Frame) -> None:
        if self.state is State.HANDSHAKE:
            self._handshake_frame(frame)
        elif frame.kind == Kind.RESPONSE:
            with self._lock:
                future = self._pending.pop(frame.request_id, None)
            if future is not None and future.set_running_or_notify_cancel():
                future.set_result(frame)
        elif self.state is State.OPEN:
            self.transport._dispatch(self, frame)

    def _handshake_frame(self, frame: wire.Frame) -> None:
        try:
            replies = self._handshake.receive(frame.kind, frame.payload)
        except HandshakeError as exc:
            reply = getattr(exc, "reply", None)
            by_peer = getattr(exc, "by_peer", False)
            reason = getattr(exc, "reason", None) or str(exc)
            if reply is not None:
                try:
                    self.send_frame(*reply)
                    self._flush()
                except (ConnectionClosed, OSError):
                    pass
            side = "peer" if by_peer else "this member"
            log.warning("handshake with %s refused (by %s): %s", _where(self.remote), side, reason)
            self._fail(f"handshake failed: {reason}", by_peer, error=exc)
            return
        for kind, payload in replies:
            self.send_frame(kind, payload)
        if self._handshake.done:
            self.peer_info = self._handshake.peer_info or {}
            self._decoder.authenticated(self.transport.max_payload)
            self._set_state(State.OPEN)
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            self._update_interest()
            self.transport._opened(self)

    def _handshake_deadline(self) -> None:
        if self.state in (State.CONNECTING, State.TLS, State.HANDSHAKE):
            reason = f"handshake with {_where(self.remote)} timed out after {self.transport.handshake_timeout} s"
            log.warning(reason)
            self._fail(reason, True, error=HandshakeError(reason))

    def _fail(self, reason: str, by_peer: bool, *, error: Exception | None = None) -> None:
        if self.state is State.CLOSED:
            return
        log.debug("%r closed: %s", self, reason)
        with self._lock:
            self.state = State.CLOSED
            self.close_reason = reason
            self.closed_by_peer = by_peer
            self._out.clear()
            pending, self._pending = self._pending, {}
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        try:
            self.transport._selector.unregister(self._sock)
        except (KeyError, ValueError):
            pass
        self._sock.close()
        self.transport._forget(self)
        exc = error or ConnectionClosed(f"connection to {self.peer_info.get('address') or self.remote}: {reason}", by_peer=by_peer)
        if isinstance(exc, ConnectionClosed) and self.outbound:
            exc = TransportError(reason)
        _set_exception(self.opened, exc)
        for future in pending.values():
            _set_exception(future, ConnectionClosed(f"{reason} (request not answered)", by_peer=by_peer))
        self.transport._closed(self)


def _set_exception(future: Future, exc: BaseException) -> None:
    """Fail ``future`` unless it is done (or being cancelled by its owner right now)."""
    if future.done():
        return
    try:
        future.set_exception(exc)
    except InvalidStateError:  # cancelled between done() and here
        pass


def _leading_bytes(buffers, limit: int) -> bytes:
    """The first ``limit`` bytes of a sequence of byte buffers, joined."""
    pieces = []
    size = 0
    for buffer in buffers:
        view = memoryview(buffer).cast("B")[: limit - size]
        pieces.append(view)
        size += view.nbytes
        if size >= limit:
            break
    return b"".join(pieces)


def _where(remote) -> str:
    """A connection's other end for messages: "host:port", or the Unix socket's path."""
    if isinstance(remote, str):
        return remote or "a local Unix socket"
    return f"{remote[0]}:{remote[1]}"


def _failed(exc: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future


class _Timer:
    __slots__ = ("when", "sequence", "callback", "args", "cancelled")

    def __init__(self, when, sequence, callback, args):
        self.when = when
        self.sequence = sequence  # timers due at the same moment run in the order they were set
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the callback (no effect once it ran)."""
        self.cancelled = True

    def __lt__(self, other):
        return (self.when, self.sequence) < (other.when, other.sequence)


class Transport:
    """One selectors loop on its own thread, the listening socket and every connection.

    Args:
        cluster_id, secret: what the handshake checks.
        info: this side's JSON-safe identity, sent in the handshake (uuid, address, role).
        on_frame: ``fn(conn, frame)`` on the IO thread for each frame after authentication
            (except RESPONSEs, which resolve their request's Future). Keep it quick.
        on_open: ``fn(conn)`` on the IO thread when a connection is authenticated.
        on_close: ``fn(conn)`` on the IO thread when an authenticated connection closes
            (exactly once, and only for connections that on_open saw).
        handshake_timeout: seconds from connect/accept until the handshake (TCP, TLS and
            HMAC) must be done; a connection still not authenticated then is closed.
        tls: a ``TlsConfig`` (or any object with ``cert``, ``key``, ``ca``) or None.
        clock: an object with ``monotonic()`` for timers (tests pass a manual one).
        max_payload: the largest frame accepted after authentication, in bytes.
        name: the IO thread's name.

    Raises:
        ConfigError: the TLS certificate, key or CA cannot be loaded.
    """

    def __init__(self, *, cluster_id: str, secret: str | None, info: dict, on_frame=None, on_open=None,
                 on_close=None, handshake_timeout: float = 5.0, tls=None, clock=time,
                 max_payload: int = wire.DEFAULT_MAX_PAYLOAD, name: str = "grid-io"):
        self.cluster_id = cluster_id
        self._secret = secret
        self.info = dict(info)
        self.on_frame = on_frame
        self.on_open = on_open
        self.on_close = on_close
        self.handshake_timeout = handshake_timeout
        self.max_payload = max_payload
        self.clock = clock
        self._server_tls = security.server_context(tls)
        self._client_tls = security.client_context(tls)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self._calls: collections.deque = collections.deque()
        self._calls_lock = threading.Lock()
        self._stopped = False  # no more calls are taken: the loop has run its last
        self._timers: list[_Timer] = []
        self._timers_lock = threading.Lock()
        self._timer_sequence = itertools.count()
        self._connections: set[Connection] = set()
        self._connections_lock = threading.Lock()
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[str] = []
        self.address: tuple[str, int] | None = None
        self._running = True
        self._thread = threading.Thread(target=self._run, name=name)
        self._thread.start()

    # -- public, any thread ----------------------------------------------------------------

    def listen(self, host: str, port: int, *, port_range: int = 100) -> tuple[str, int]:
        """Bind and listen on ``host:port``, trying up to ``port_range`` ports upwards.

        Port 0 lets the OS choose. Returns the bound address.

        Raises:
            TransportError: no port in the range could be bound, or the transport is closed.
        """
        if not self._running:
            raise TransportError("cannot listen: this transport is closed; make a new Transport")
        last_error = None
        candidates = [0] if port == 0 else range(port, min(port + port_range, 65536))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for candidate in candidates:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, candidate))
                sock.listen(_ACCEPT_BACKLOG)
            except OSError as exc:
                sock.close()
                last_error = exc
                continue
            sock.setblocking(False)
            self._listeners.append(sock)
            bound = sock.getsockname()[:2]
            self.call_soon(self._selector.register, sock, selectors.EVENT_READ, lambda mask, s=sock: self._accept(s))
            self.address = (bound[0], bound[1])
            return self.address
        raise TransportError(
            f"cannot listen on {host} ports {candidates[0]}..{candidates[-1]}: {last_error}; "
            "free a port or set another `port` in the config"
        ) from last_error

    def listen_unix(self, path: str) -> str:
        """Also listen on a Unix socket at ``path`` (owner-only), for processes of this machine.

        It skips the TCP/IP stack: lower latency and more throughput for local links.
        The same handshake applies. The file is removed when the transport closes.

        Raises:
            TransportError: the socket could not be made.
        """
        if not self._running:
            raise TransportError("cannot listen: this transport is closed; make a new Transport")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(path):
                os.unlink(path)
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(_ACCEPT_BACKLOG)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot listen on the Unix socket {path}: {exc}") from exc
        sock.setblocking(False)
        self._listeners.append(sock)
        self._unix_paths.append(path)
        self.call_soon(self._selector.register, sock, selectors.EVENT_READ, lambda mask, s=sock: self._accept(s))
        return path

    def connect(self, address: tuple[str, int] | str) -> Future:
        """Start connecting and authenticating; the Future resolves to an open ``Connection``.

        It fails with ``TransportError`` (refused, unreachable) or ``HandshakeError``
        (wrong secret or cluster id, timeout) within ``handshake_timeout``.
        """
        if isinstance(address, str):  # a Unix socket of a member on this machine
            family, remote = socket.AF_UNIX, address
        else:
            host, port = address
            family, remote = (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, port)
        if not self._running:
            return _failed(TransportError(f"cannot connect to {_where(remote)}: this transport is closed"))
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            return _failed(TransportError(f"cannot create a socket: {exc}"))
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(self, sock, outbound=True, remote=remote)
        if not self._schedule(self._start_connect, conn, inline=True):
            sock.close()
            return _failed(TransportError(f"cannot connect to {_where(remote)}: this transport is closed"))
        return conn.opened

    def call_soon(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the IO thread (runs inline when already on it).

        Once the transport is closed, calls are dropped.
        """
        self._schedule(fn, *args, inline=True)

    def _defer(self, fn, *args) -> None:
        """Like call_soon, but never inline: after the current event, even on the IO thread."""
        self._schedule(fn, *args, inline=False)

    def _schedule(self, fn, *args, inline: bool) -> bool:
        if inline and threading.current_thread() is self._thread:
            fn(*args)
            return True
        with self._calls_lock:
            if self._stopped:
                return False
            self._calls.append((fn, args))
        if threading.current_thread() is not self._thread:
            self._wake()
        return True

    def call_later(self, delay: float, fn, *args) -> _Timer:
        """Run ``fn(*args)`` on the IO thread after ``delay`` seconds; returns a cancellable handle.

        Timers due at the same time run in the order they were set.
        """
        with self._timers_lock:
            timer = _Timer(self.clock.monotonic() + delay, next(self._timer_sequence), fn, args)
            heapq.heappush(self._timers, timer)
        if threading.current_thread() is not self._thread:
            self._wake()
        return timer

    @property
    def connections(self) -> list[Connection]:
        """The connections now open or opening (a snapshot, safe from any thread)."""
        with self._connections_lock:
            return list(self._connections)

    def close(self) -> None:
        """Close every connection and the listener, stop the IO thread and join it."""
        if not self._running:
            return
        if threading.current_thread() is self._thread:
            raise RuntimeError("Transport.close() called from its own IO thread")
        self._running = False
        self._wake()
        self._thread.join()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- IO thread ---------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending) or we are shutting down

    def _drain_wake(self, mask) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _run(self) -> None:
        try:
            while self._running:
                timeout = None
                with self._timers_lock:
                    if self._timers:
                        timeout = max(0.0, self._timers[0].when - self.clock.monotonic())
                if self._calls:
                    timeout = 0
                for key, mask in self._selector.select(timeout):
                    try:
                        key.data(mask)
                    except Exception:  # a bug in a handler must not stop the loop
                        log.exception("error handling an event on %r", key.fileobj)
                self._run_calls()
                self._run_timers()
        finally:
            self._shutdown()

    def _run_calls(self) -> None:
        calls = self._calls
        while calls:
            fn, args = calls.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("error in a call on the IO thread: %r", fn)

    def _run_timers(self) -> None:
        now = self.clock.monotonic()
        due = []
        with self._timers_lock:
            while self._timers and self._timers[0].when <= now:
                due.append(heapq.heappop(self._timers))
        for timer in due:
            if timer.cancelled:
                continue
            try:
                timer.callback(*timer.args)
            except Exception:
                log.exception("error in a timer on the IO thread: %r", timer.callback)

    def _start_connect(self, conn: Connection) -> None:
        self._remember(conn)
        conn._deadline_timer = self.call_later(self.handshake_timeout, conn._handshake_deadline)
        try:
            result = conn._sock.connect_ex(conn.remote)
        except OSError as exc:
            conn._fail(f"cannot connect to {_where(conn.remote)}: {exc}", True)
            return
        if result not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            conn._fail(f"cannot connect to {_where(conn.remote)}: {errno.errorcode.get(result, result)}", True)
            return
        conn._events = selectors.EVENT_WRITE
        self._selector.register(conn._sock, selectors.EVENT_WRITE, conn._on_event)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                sock, remote = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            try:
                sock.setblocking(False)
                if listener.family != socket.AF_UNIX:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._server_tls is not None:
                    sock = self._server_tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError as exc:  # reset before we got to it
                log.info("dropping a connection from %s at once: %s", _where(remote), exc)
                sock.close()
                continue
            conn = Connection(self, sock, outbound=False, remote=remote)
            self._remember(conn)
            conn._deadline_timer = self.call_later(self.handshake_timeout, conn._handshake_deadline)
            if self._server_tls is not None:
                conn._set_state(State.TLS)
                conn._events = selectors.EVENT_READ
                self._selector.register(sock, selectors.EVENT_READ, conn._on_event)
                continue
            conn._events = selectors.EVENT_READ
            self._selector.register(sock, selectors.EVENT_READ, conn._on_event)
            conn._begin_handshake()

    def _opened(self, conn: Connection) -> None:
        if conn.outbound:
            if conn.opened.set_running_or_notify_cancel():
                conn.opened.set_result(conn)
            else:  # nobody wants it any more
                conn._fail("connect was cancelled", False)
                return
        else:
            conn.opened.set_running_or_notify_cancel()
            conn.opened.set_result(conn)
        conn._announced = True
        if self.on_open is not None:
            try:
                self.on_open(conn)
            except Exception:
                log.exception("error in on_open for %r", conn)

    def _dispatch(self, conn: Connection, frame: wire.Frame) -> None:
        if self.on_frame is None:
            log.debug("dropping a %s frame from %r: no on_frame handler", frame.kind.name, conn)
            return
        try:
            self.on_frame(conn, frame)
        except Exception:
            log.exception("error handling a %s frame from %r", frame.kind.name, conn)

    def _remember(self, conn: Connection) -> None:
        with self._connections_lock:
            self._connections.add(conn)

    def _forget(self, conn: Connection) -> None:
        with self._connections_lock:
            self._connections.discard(conn)

    def _closed(self, conn: Connection) -> None:
        if conn._announced and self.on_close is not None:
            try:
                self.on_close(conn)
            except Exception:
                log.exception("error in on_close for %r", conn)

    def _shutdown(self) -> None:
        with self._calls_lock:
            self._stopped = True  # from here call_soon drops, connect fails at once
        self._run_calls()
        for conn in self.connections:
            conn._fail("transport closed", False)
        for listener in self._listeners:
            try:
                self._selector.unregister(listener)
            except (KeyError, ValueError):
                pass
            listener.close()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
