"""The selectors loop: the IO thread, listening, accepting, connecting, calls and timers.

::

    caller threads                          IO thread ("grid-io", one per Transport)
    --------------                          ----------------------------------------
    transport.listen(host, port) ---------> listener readable -> accept -> Connection
                                              -> conn.start_accepted(tls)
    transport.connect(addr) -> Future ----> Connection -> conn.start_connect(): non-blocking connect
                                            select() -> a socket is ready -> the callback its
                                              Connection watches it with (Driver.watch):
    conn.send_frame() --sendmsg()--> socket     (directly, when nothing is queued)
         `-- what did not fit --> conn's queue --wake--> EVENT_WRITE -> flush
    conn.request(payload) -> Future             connect -> TLS -> handshake -> on_open(conn)
                                                readable -> FrameDecoder.feed()
                                                  handshake frames -> security.*Handshake
                                                  RESPONSE frames  -> the request's Future
                                                  other frames     -> on_frame(conn, frame)
                                                closed -> on_close(conn)
    transport.call_soon(fn) --wake--------> fn() after the ready sockets (inline on the IO thread)
    transport.call_later(delay, fn) ------> fn() when due; due together: in the order set

The transport layer is two files. This one owns the selector and the IO thread: it binds
and accepts, starts outbound connects, runs calls and timers, keeps the set of
connections and calls the layer above (``on_open``, ``on_frame``, ``on_close``).
``connection.py`` holds ``Connection`` (everything under ``conn.`` above): one socket's
state machine from connect to close, with its TLS, handshake, framing, reads, writes and
the requests awaiting a response. Their seam is public and one-way: ``connection.py``
defines ``Driver``, what a Connection needs from its loop, and imports nothing from
here; this file implements it (``_Driver``, one per Transport, handed to each Connection
it makes) and drives a Connection only through ``start_connect()``,
``start_accepted(tls)`` and ``abort(reason, by_peer)``. Deviation from the house rule
"sockets live in one file": these two files hold all of grid's TCP and Unix socket code;
nothing above them touches a socket.

Nothing but handshake frames is accepted before authentication. Every ``OSError`` is
translated at this edge into grid's ``TransportError``/``ConnectionClosed``, saying
whether we or the peer closed the connection.

Under load that is not ours to fix the loop stays quiet: connections that fail before
authentication are logged once per source per ``failure_log_interval`` with a count of
the rest (``FailureLog``), and when accept runs out of file descriptors (EMFILE, ENFILE)
the listener is paused and retried with a growing delay instead of spinning.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from concurrent.futures import Future

from ..errors import TransportError
from . import security, wire
from .address import describe_remote
from .connection import Connection, Driver

log = logging.getLogger("grid.transport")

_ACCEPT_BACKLOG = 512
_ACCEPT_PAUSE_FIRST = 0.05  # seconds a listener rests after accept ran out of descriptors ...
_ACCEPT_PAUSE_MAX = 2.0  # ... doubling up to this while it keeps running out
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


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


class FailureLog:
    """Failures before authentication, logged once per source per interval, with a count of the rest.

    The first failure from a source (a host; all local Unix sockets are one source) is
    logged at once; the ones after it within ``interval`` seconds are counted, and the
    count is logged when the interval ends (from a timer), with the last reason. At most
    ``max_sources`` sources are tracked; failures from more are counted together.

    Args:
        logger: where the lines go (as warnings).
        clock: an object with ``monotonic()``.
        call_later: ``fn(delay, callback)``, to report the counts when their interval ends.
    """

    def __init__(self, logger: logging.Logger, clock, call_later, *, interval: float = 10.0, max_sources: int = 1024):
        self._logger = logger
        self._clock = clock
        self._call_later = call_later
        self.interval = interval
        self._max_sources = max_sources
        self._windows: dict[str, list] = {}  # source -> [interval end, failures counted, last message]
        self._timer = None

    def note(self, remote: tuple | str, message: str) -> None:
        """One failure from ``remote`` (a socket address), with the line that says what happened."""
        source = remote[0] if isinstance(remote, tuple) else "local Unix sockets"
        now = self._clock.monotonic()
        self._report(now)
        window = self._windows.get(source)
        if window is not None:
            window[1] += 1
            window[2] = message
            if self._timer is None:
                self._timer = self._call_later(max(0.0, window[0] - now), self._on_timer)
            return
        if len(self._windows) >= self._max_sources:
            source = "other sources"
            if source in self._windows:
                self._windows[source][1] += 1
                self._windows[source][2] = message
                return
        self._windows[source] = [now + self.interval, 0, message]
        self._logger.warning("%s", message)

    def _on_timer(self) -> None:
        self._timer = None
        self._report(self._clock.monotonic())
        pending = [window[0] for window in self._windows.values() if window[1]]
        if pending:
            self._timer = self._call_later(max(0.0, min(pending) - self._clock.monotonic()), self._on_timer)

    def _report(self, now: float) -> None:
        for source, (until, count, last) in list(self._windows.items()):
            if now < until:
                continue
            del self._windows[source]
            if count:
                self._logger.warning("%d more connections from %s failed before authentication in the last %g s "
                                     "(the last: %s)", count, source, self.interval, last)


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
        max_payload: the largest frame accepted after authentication, in bytes (config
            ``max_frame_bytes``); a bigger one closes its link, naming the limit.
        failure_log_interval: seconds over which repeated failures before authentication
            from one source are counted into one log line.
        name: the IO thread's name.

    Raises:
        ConfigError: the TLS certificate, key or CA cannot be loaded.
    """

    def __init__(self, *, cluster_id: str, secret: str | None, info: dict, on_frame=None, on_open=None,
                 on_close=None, handshake_timeout: float = 5.0, tls=None, clock=time,
                 max_payload: int = wire.DEFAULT_MAX_PAYLOAD, failure_log_interval: float = 10.0,
                 name: str = "grid-io"):
        self.cluster_id = cluster_id
        self.info = dict(info)
        self.on_frame = on_frame
        self.on_open = on_open
        self.on_close = on_close
        self.handshake_timeout = handshake_timeout
        self.max_payload = max_payload
        self.clock = clock
        self.faults = None  # a net.faults.Faults while the simulator splits the network, else None
        self._server_tls = security.server_context(tls)
        client_tls = security.client_context(tls)
        self._selector = selectors.DefaultSelector()
        self.traffic = [0, 0]  # bytes read and written on its connections (metrics; updated without a lock)
        self._driver = _Driver(self, self._selector, secret=secret, client_tls=client_tls)
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
        self._accept_pause = _ACCEPT_PAUSE_FIRST
        self._accept_failures = 0  # accepts refused for lack of descriptors since the last that worked
        self.failures = FailureLog(log, clock, self.call_later, interval=failure_log_interval)
        self.address: tuple[str, int] | None = None
        self._running = True
        self._thread = threading.Thread(target=self._run, name=name)
        self._thread.start()

    # -- public, any thread ----------------------------------------------------------------

    def listen(self, host: str, port: int, *, port_range: int = 100) -> tuple[str, int]:
        """Bind and listen on ``host:port``, trying up to ``port_range`` ports upwards.

        Port 0 lets the OS choose. Returns the bound address; ``skipped_ports`` lists the
        ``(port, why)`` it tried before that one.

        Raises:
            TransportError: no port in the range could be bound, or the transport is closed.
        """
        if not self._running:
            raise TransportError("cannot listen: this transport is closed; make a new Transport")
        last_error = None
        self.skipped_ports: list[tuple[int, str]] = []
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
                self.skipped_ports.append((candidate, exc.strerror or str(exc)))
                continue
            sock.setblocking(False)
            self._listeners.append(sock)
            bound = sock.getsockname()[:2]
            self.call_soon(self._watch_listener, sock)
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
        self.call_soon(self._watch_listener, sock)
        return path

    def connect(self, address: tuple[str, int] | str, *, expect_uuid: str | None = None) -> Future:
        """Start connecting and authenticating; the Future resolves to an open ``Connection``.

        The handshake checks that the process that answers is the one listening at
        ``address`` (not a relay), and with ``expect_uuid`` that it is that member.

        It fails with ``TransportError`` (refused, unreachable) or ``HandshakeError``
        (wrong secret or cluster id, another member or a relay answered, timeout)
        within ``handshake_timeout``.
        """
        if isinstance(address, str):  # a Unix socket of a member on this machine
            family, remote = socket.AF_UNIX, address
        else:
            host, port = address
            family, remote = (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, port)
        if not self._running:
            return _failed(TransportError(f"cannot connect to {describe_remote(remote)}: this transport is closed"))
        if self.faults is not None and self.faults.blocks_dial(remote):
            return _failed(TransportError(f"cannot connect to {describe_remote(remote)}: unreachable "
                                          "(a simulated network split)"))
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            return _failed(TransportError(f"cannot create a socket: {exc}"))
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(self._driver, sock, outbound=True, remote=remote, expect_uuid=expect_uuid)
        if not self._schedule(self._start_connect, conn, inline=True):
            sock.close()
            return _failed(TransportError(f"cannot connect to {describe_remote(remote)}: this transport is closed"))
        return conn.opened

    def call_soon(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the IO thread (runs inline when already on it).

        Once the transport is closed, calls are dropped.
        """
        self._schedule(fn, *args, inline=True)

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
        conn.start_connect()

    def _watch_listener(self, listener: socket.socket) -> None:
        if listener.fileno() != -1:
            self._selector.register(listener, selectors.EVENT_READ, lambda mask, s=listener: self._accept(s))

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                sock, remote = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._pause_accepting(listener, exc)
                else:
                    log.warning("accept failed: %s", exc)
                return
            if self._accept_failures:
                log.warning("accepting connections again, after %d attempts failed for lack of file descriptors",
                            self._accept_failures)
                self._accept_failures = 0
                self._accept_pause = _ACCEPT_PAUSE_FIRST
            try:
                sock.setblocking(False)
                if listener.family != socket.AF_UNIX:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._server_tls is not None:
                    sock = self._server_tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError as exc:  # reset before we got to it
                log.info("dropping a connection from %s at once: %s", describe_remote(remote), exc)
                sock.close()
                continue
            conn = Connection(self._driver, sock, outbound=False, remote=remote)
            self._remember(conn)
            conn.start_accepted(tls=self._server_tls is not None)

    def _pause_accepting(self, listener: socket.socket, exc: OSError) -> None:
        # The connection stays in the backlog and the listener stays readable: retrying at
        # once would spin. Rest, longer each time, and log only the first failure of a run.
        if not self._accept_failures:
            log.warning("cannot accept connections: %s; pausing accepts (retrying with growing delays up to %g s) "
                        "until descriptors are free: raise the open-files limit (ulimit -n) or close connections",
                        exc, _ACCEPT_PAUSE_MAX)
        self._accept_failures += 1
        try:
            self._selector.unregister(listener)
        except (KeyError, ValueError):
            pass
        self.call_later(self._accept_pause, self._watch_listener, listener)
        self._accept_pause = min(self._accept_pause * 2, _ACCEPT_PAUSE_MAX)

    def _remember(self, conn: Connection) -> None:
        with self._connections_lock:
            self._connections.add(conn)

    def _forget(self, conn: Connection) -> None:
        with self._connections_lock:
            self._connections.discard(conn)

    def _shutdown(self) -> None:
        with self._calls_lock:
            self._stopped = True  # from here call_soon drops, connect fails at once
        self._run_calls()
        for conn in self.connections:
            conn.abort("transport closed", False)
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


class _Driver(Driver):
    """A Transport as its connections see it: one per Transport, shared by its connections."""

    def __init__(self, owner: Transport, selector: selectors.BaseSelector, *, secret: str | None, client_tls):
        self._owner = owner
        self._selector = selector
        self.secret = secret
        self.client_tls = client_tls
        self.traffic = owner.traffic

    # The settings stay the Transport's, read when used: peer.py fills in info["address"] later.
    @property
    def cluster_id(self) -> str:
        return self._owner.cluster_id

    @property
    def info(self) -> dict:
        return self._owner.info

    @property
    def max_payload(self) -> int:
        return self._owner.max_payload

    @property
    def handshake_timeout(self) -> float:
        return self._owner.handshake_timeout

    def watch(self, sock, events, on_event) -> None:
        self._selector.register(sock, events, on_event)

    def rewatch(self, sock, events, on_event) -> None:
        self._selector.modify(sock, events, on_event)

    def unwatch(self, sock) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def call_soon(self, fn, *args) -> None:
        self._owner._schedule(fn, *args, inline=True)

    def defer(self, fn, *args) -> None:
        self._owner._schedule(fn, *args, inline=False)

    def call_later(self, delay: float, fn, *args) -> _Timer:
        return self._owner.call_later(delay, fn, *args)

    def connection_opened(self, conn: Connection) -> None:
        on_open = self._owner.on_open
        if on_open is not None:
            try:
                on_open(conn)
            except Exception:
                log.exception("error in on_open for %r", conn)

    def frame_received(self, conn: Connection, frame: wire.Frame) -> None:
        faults = self._owner.faults
        if faults is not None and faults.drops(conn):
            return  # a simulated network split: this link meets silence
        on_frame = self._owner.on_frame
        if on_frame is None:
            log.debug("dropping a %s frame from %r: no on_frame handler", frame.kind.name, conn)
            return
        try:
            on_frame(conn, frame)
        except Exception:
            log.exception("error handling a %s frame from %r", frame.kind.name, conn)

    def forget(self, conn: Connection) -> None:
        self._owner._forget(conn)

    def log_failure(self, remote, message: str) -> None:
        self._owner.failures.note(remote, message)

    def connection_closed(self, conn: Connection) -> None:
        on_close = self._owner.on_close
        if on_close is not None:
            try:
                on_close(conn)
            except Exception:
                log.exception("error in on_close for %r", conn)
