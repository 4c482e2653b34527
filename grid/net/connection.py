"""One connection's state machine: TLS, the handshake, framing, reads, writes, requests.

::

    caller threads                          IO thread (the loop calls back conn._on_event)
    --------------                          ----------------------------------------------
                                            start_connect() / start_accepted(tls): watch the socket
    conn.send_frame() --sendmsg()--> socket     (directly, when nothing is queued)
         `-- what did not fit --> conn._out --wake--> EVENT_WRITE -> _flush
    conn.request(payload) -> Future             CONNECTING -> (TLS) -> HANDSHAKE -> OPEN
         kept in _pending by request id           -> driver.connection_opened(conn)
    conn.close() --call_soon--> abort           readable -> _read: recv_into the connection's own buffer
                                                  (a large frame's: its own) -> FrameDecoder
                                                  handshake frames -> security.*Handshake
                                                  RESPONSE frames  -> the request's Future
                                                  other frames     -> driver.frame_received(conn, frame)
                                                abort() -> CLOSED: driver.forget(conn), pending
                                                  requests fail, driver.connection_closed(conn)

Nothing but handshake frames is accepted before authentication, and the
decoder caps them at 4 KiB. After it, on a link whose handshake turned the frame
MAC on, every frame sent gets its MAC trailer (``wire.FrameSealer``; one frame at a
time under ``_frame_lock``, so the sequence numbers follow the wire) and every frame
received is checked by the decoder before it is handed up. Failures before
authentication are logged through the driver (``Driver.log_failure``), which counts
repeats per source. Every ``OSError`` of a read or write is translated here into
grid's ``TransportError``/``ConnectionClosed``, saying whether we or the peer
closed the connection.

The transport layer is two files: ``transport.py`` is the loop (the IO thread, the
selector, listening, accepting, starting connects, call_soon and timers) and makes a
``Connection`` per socket; this file is everything one socket does after that. This
file does not import that one: the seam is the ``Driver`` below, what a Connection
needs from the loop that drives it, which the Transport hands to each Connection it
makes (``conn.driver``). Through it a Connection watches its socket (``watch``,
``rewatch``, ``unwatch``), runs code on the IO thread (``call_soon``, ``defer``,
``call_later``), reads the handshake settings, and reports ``connection_opened``,
``frame_received``, ``forget`` and ``connection_closed``, and failures before
authentication (``log_failure``, which counts repeats). The other way, the Transport
starts a Connection with ``start_connect()`` or ``start_accepted(tls)`` and ends it with
``abort(reason, by_peer)``; neither side touches the other's underscore names.
Deviation from the house rule "sockets live in one file": these two files hold all of
grid's TCP and Unix socket code; nothing above them touches a socket.
"""

from __future__ import annotations

import abc
import collections
import enum
import errno
import itertools
import logging
import os
import selectors
import socket
import ssl
import struct
import threading
from concurrent.futures import Future, InvalidStateError

from ..errors import ConnectionClosed, HandshakeError, ProtocolError, TransportError
from . import security, wire
from .address import describe_remote, format_address
from .wire import Flag, Kind

log = logging.getLogger("grid.transport")  # one logger for the transport layer, whichever file logs

_RECV_SIZE = 64 * 1024  # one read at most, into the connection's own buffer (a large frame's go into its own)
_SPARES_IDLE = 2.0  # seconds without a large frame after which the buffers kept for them are let go
_IOV_BATCH = 512  # buffers per sendmsg(); Linux refuses more than IOV_MAX (1024) with EMSGSIZE
_TLS_WRITE_SIZE = 256 * 1024  # bytes per SSL write; a retry after WANT_WRITE resends the same prefix


class State(enum.Enum):
    CONNECTING = "connecting"
    TLS = "tls"
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


# The states as globals for the per-frame paths (looking a member up on the enum costs 10x).
_CONNECTING, _TLS, _HANDSHAKE, _OPEN, _CLOSED = State.CONNECTING, State.TLS, State.HANDSHAKE, State.OPEN, State.CLOSED

_TRANSITIONS = {
    State.CONNECTING: {State.TLS, State.HANDSHAKE, State.CLOSED},
    State.TLS: {State.HANDSHAKE, State.CLOSED},
    State.HANDSHAKE: {State.OPEN, State.CLOSED},
    State.OPEN: {State.CLOSED},
    State.CLOSED: set(),
}


class Driver(abc.ABC):
    """What a Connection needs from the loop that drives it; a ``Transport`` hands over its own.

    ``call_soon`` and ``call_later`` may be called from any thread, the rest only on the
    IO thread, which is the one that runs every callback. The settings are read when they
    are used, so a change (a member fills in ``info["address"]`` once it listens) reaches
    the next handshake.

    Attributes:
        cluster_id, secret, info: what this side's handshake sends and checks.
        max_payload: the largest frame accepted after authentication, in bytes.
        handshake_timeout: seconds from connect/accept until the handshake must be done.
        client_tls: the ``ssl.SSLContext`` an outbound connection wraps its socket in, or None.
    """

    cluster_id: str
    secret: str | None
    info: dict
    max_payload: int
    handshake_timeout: float
    client_tls: ssl.SSLContext | None

    @abc.abstractmethod
    def watch(self, sock: socket.socket, events: int, on_event) -> None:
        """Call ``on_event(mask)`` whenever ``sock`` is ready for ``events`` (selectors.EVENT_*)."""

    @abc.abstractmethod
    def rewatch(self, sock: socket.socket, events: int, on_event) -> None:
        """Change what a watched ``sock`` is watched for."""

    @abc.abstractmethod
    def unwatch(self, sock: socket.socket) -> None:
        """Stop watching ``sock``; nothing happens if it is not watched."""

    @abc.abstractmethod
    def call_soon(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the IO thread: inline when already on it; dropped once the loop stopped."""

    @abc.abstractmethod
    def defer(self, fn, *args) -> None:
        """Like ``call_soon``, but never inline: after the current event, even on the IO thread."""

    @abc.abstractmethod
    def call_later(self, delay: float, fn, *args):
        """Run ``fn(*args)`` on the IO thread after ``delay`` seconds; returns a handle with ``cancel()``."""

    @abc.abstractmethod
    def connection_opened(self, conn: Connection) -> None:
        """``conn`` is authenticated and its ``opened`` Future resolved."""

    @abc.abstractmethod
    def frame_received(self, conn: Connection, frame: wire.Frame) -> None:
        """A frame other than a RESPONSE arrived on the open ``conn``."""

    @abc.abstractmethod
    def forget(self, conn: Connection) -> None:
        """``conn`` (open or not) is closing: no longer count it; its futures fail next."""

    @abc.abstractmethod
    def connection_closed(self, conn: Connection) -> None:
        """``conn``, which ``connection_opened`` saw, is closed (called once, after its futures failed)."""

    @abc.abstractmethod
    def log_failure(self, remote: tuple | str, message: str) -> None:
        """Log a connection from ``remote`` that failed before authentication (repeats are counted, not logged)."""


class Connection:
    """One authenticated (or authenticating) connection to another process.

    Made by ``Transport.connect`` or when a listener accepts, never directly, and started
    by its maker with ``start_connect()`` or ``start_accepted()``. ``driver`` is the
    ``Driver`` it runs under; the layers above may use its ``call_soon`` and
    ``call_later`` to run code on this connection's IO thread.
    """

    def __init__(self, driver: Driver, sock: socket.socket, *, outbound: bool, remote: tuple | str,
                 expect_uuid: str | None = None):
        self.driver = driver
        self._traffic = getattr(driver, "traffic", None) or [0, 0]  # [bytes in, bytes out], the transport's
        self.outbound = outbound
        self.remote = remote
        self.expect_uuid = expect_uuid  # outbound: the member uuid the handshake must find, if known
        self.frame_mac: bool | None = None  # once open: whether its frames carry a MAC
        self.state = State.CONNECTING
        self.peer_info: dict = {}
        self.close_reason: str | None = None
        self.closed_by_peer = False
        self.opened = Future()  # resolves to self once authenticated
        self.attachment = None  # free slot for the layer above (e.g. the member this link belongs to)
        self.farewell: str | None = None  # why the peer said it closes this link, if it said
        self._sock = sock
        self._lock = threading.Lock()
        # Reads and the decoder: the IO thread's, or a thread's the reading is lent to
        # (``lend_reading``); held while a read's frames are handled, so they stay in order.
        self._read_lock = threading.RLock()
        self._lent = False
        self._out: collections.deque = collections.deque()
        self._decoder = wire.FrameDecoder()
        self._inbox: bytearray | None = None  # what each read fills, reused (made on the first read)
        self._spares_timer = None  # set while the decoder keeps buffers for large frames
        self._large_frames_seen = 0  # the decoder's count of them when that timer was set
        self._sealer: wire.FrameSealer | None = None  # set when the link opens with the frame MAC on
        self._frame_lock = threading.Lock()  # MACed links: one frame is sent whole, MAC included, at a time
        self._handshake = None
        self._pending: dict[int, Future] = {}
        self._request_ids = itertools.count(1)
        self._deadline_timer = None
        self._events = 0
        self._announced = False  # connection_opened was reported, so connection_closed will be

    def __repr__(self) -> str:
        who = self.peer_info.get("address") or describe_remote(self.remote)
        return f"<Connection {'to' if self.outbound else 'from'} {who} {self.state.value}>"

    @property
    def is_open(self) -> bool:
        return self.state is State.OPEN

    def _set_state(self, new: State) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"connection state {self.state.value} cannot go to {new.value}")
        self.state = new

    # -- starting (IO thread, by the Transport) ------------------------------------------

    def start_connect(self) -> None:
        """Connect the socket to ``remote`` without blocking; TLS (if set) and the handshake follow.

        A connect that fails at once closes the connection: ``opened`` fails with TransportError.
        """
        driver = self.driver
        self._deadline_timer = driver.call_later(driver.handshake_timeout, self._handshake_deadline)
        try:
            result = self._sock.connect_ex(self.remote)
        except OSError as exc:
            self.abort(f"cannot connect to {describe_remote(self.remote)}: {exc}", True)
            return
        if result not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self.abort(f"cannot connect to {describe_remote(self.remote)}: {errno.errorcode.get(result, result)}", True)
            return
        self._events = selectors.EVENT_WRITE
        driver.watch(self._sock, selectors.EVENT_WRITE, self._on_event)

    def start_accepted(self, tls: bool) -> None:
        """Serve an accepted socket: the TLS handshake first when ``tls`` (the socket is wrapped), then ours."""
        driver = self.driver
        self._deadline_timer = driver.call_later(driver.handshake_timeout, self._handshake_deadline)
        if tls:
            self._set_state(State.TLS)
        self._events = selectors.EVENT_READ
        driver.watch(self._sock, selectors.EVENT_READ, self._on_event)
        if not tls:
            try:
                self._begin_handshake()
            except ConnectionClosed as exc:
                self.abort(str(exc), True)

    # -- sending (any thread) ------------------------------------------------------------

    def send_frame(self, kind: Kind, payload=b"", *, request_id: int = 0, flags: int = 0) -> None:
        """Queue one frame; writes at once from the calling thread when nothing is queued.

        Raises:
            ConnectionClosed: the connection is closed (or failed while writing).
        """
        sealer = self._sealer
        if sealer is None:
            self._send_buffers(wire.encode_frame(kind, payload, request_id=request_id, flags=flags))
            return
        buffers = wire.encode_frame(kind, payload, request_id=request_id, flags=flags, trailer=wire.MAC_SIZE)
        # One frame at a time from header to MAC, so the sequence numbers follow the wire. A
        # large frame goes out before it is hashed and its MAC after: the hashing (which lets
        # go of the GIL) overlaps the sending, and the receiver hashes as the bytes arrive.
        with self._frame_lock:
            if wire.HEADER.unpack_from(buffers[0])[-1] < wire.LARGE_FRAME:
                buffers.append(sealer.seal(sealer.prepare(buffers)))
                self._send_buffers(buffers)
                return
            self._send_buffers(buffers)
            self._send_buffers([sealer.seal(sealer.prepare(buffers))])

    def _send_buffers(self, buffers: list) -> None:
        failure = None
        with self._lock:
            state = self.state
            if state is _CLOSED:
                raise ConnectionClosed(f"{self!r} is closed: {self.close_reason}", by_peer=self.closed_by_peer)
            if self._out or state is not _OPEN and state is not _HANDSHAKE:
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
            # Not inline: on the IO thread (a reply from on_frame) abort would run in
            # the middle of _read, and it takes self._lock, which we held just now.
            self.driver.defer(self.abort, f"write failed: {failure}", True)
            raise ConnectionClosed(f"{self!r}: write failed: {failure}", by_peer=True) from failure
        if queued_first and self.state in (_OPEN, _HANDSHAKE):
            self.driver.call_soon(self._update_interest)

    def _write(self, buffers) -> int:
        """Write from the start of ``buffers`` (a list or the queue); return the bytes sent."""
        try:
            if isinstance(self._sock, ssl.SSLSocket):
                # An SSL write is all or nothing, and after WANT_WRITE it must be retried
                # with the same leading bytes: always offer the first _TLS_WRITE_SIZE queued.
                sent = self._sock.send(_leading_bytes(buffers, _TLS_WRITE_SIZE))
            elif type(buffers) is list and len(buffers) <= _IOV_BATCH:
                sent = self._sock.sendmsg(buffers)
            else:
                sent = self._sock.sendmsg(list(itertools.islice(buffers, _IOV_BATCH)))
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0
        self._traffic[1] += sent
        return sent

    def _queue_remainder(self, buffers, sent: int) -> None:
        for buffer in buffers:
            size = len(buffer) if type(buffer) is bytes else memoryview(buffer).nbytes
            if sent >= size:
                sent -= size
                continue
            self._out.append(memoryview(buffer).cast("B")[sent:])
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

        def forget_if_cancelled(done: Future) -> None:  # a caller that gives up must not leak its entry
            if done.cancelled():
                self.forget_request(future.request_id)

        future.add_done_callback(forget_if_cancelled)
        self.request_into(future, payload, flags=flags)
        return future

    def request_into(self, slot, payload, *, flags: int = 0) -> None:
        """Send a REQUEST frame whose RESPONSE ``Frame`` goes to ``slot`` (``set_result``, or
        ``set_exception`` once the connection closes): a Future, or anything as lean with those
        methods and ``set_running_or_notify_cancel`` (``messaging.Call``). Sets ``slot.request_id``."""
        with self._lock:
            request_id = next(self._request_ids)
            self._pending[request_id] = slot
        slot.request_id = request_id
        try:
            self.send_frame(Kind.REQUEST, payload, request_id=request_id, flags=flags)
        except ConnectionClosed as exc:
            with self._lock:
                self._pending.pop(request_id, None)
            slot.set_exception(exc)

    def forget_request(self, request_id: int) -> None:
        """Stop waiting for the answer to ``request_id`` (it is dropped when it comes)."""
        with self._lock:
            self._pending.pop(request_id, None)

    def respond(self, request_id: int, payload, *, error: bool = False) -> None:
        """Answer the REQUEST ``request_id``; ``error`` marks the payload as a failure.

        Raises:
            ConnectionClosed: the connection is closed (or failed while writing).
        """
        self.send_frame(Kind.RESPONSE, payload, request_id=request_id, flags=Flag.ERROR if error else 0)

    def close(self, reason: str = "closed by this side") -> None:
        """Close from any thread; queued output is dropped."""
        self.driver.call_soon(self.abort, reason, False)

    # -- IO thread ------------------------------------------------------------------------

    def _update_interest(self) -> None:
        if self.state is State.CLOSED:
            return
        events = 0 if self._lent else selectors.EVENT_READ
        if self.state is State.CONNECTING or (self._out and self.state is State.OPEN) or self._out and self.state is State.HANDSHAKE:
            events |= selectors.EVENT_WRITE
        if self.state is State.CONNECTING:
            events = selectors.EVENT_WRITE
        if events == self._events:
            return
        if not events:
            self.driver.unwatch(self._sock)
        elif not self._events:
            self.driver.watch(self._sock, events, self._on_event)
        else:
            self.driver.rewatch(self._sock, events, self._on_event)
        self._events = events

    def _on_event(self, mask: int) -> None:
        try:
            if self.state is _CONNECTING:
                self._finish_connect()
            elif self.state is _TLS:
                self._continue_tls()
            else:
                if mask & selectors.EVENT_WRITE:
                    self._flush()
                if mask & selectors.EVENT_READ:
                    with self._read_lock:
                        if self._lent:  # another thread reads it now: stop watching for reads
                            self._update_interest()
                        else:
                            self._read()
        except Exception as exc:
            self._read_failed(exc)

    def _read_failed(self, exc: Exception) -> None:
        """IO thread: a read or write raised ``exc``; close the connection, saying why."""
        if isinstance(exc, ProtocolError):
            if self.state is State.OPEN:
                log.warning("closing %r: protocol error: %s", self, exc)
            else:
                self.driver.log_failure(self.remote, f"closing {self!r}: protocol error: {exc}")
            self.abort(f"protocol error: {exc}", False)
        elif isinstance(exc, (ConnectionClosed, OSError)):
            self.abort(str(exc) or type(exc).__name__, True)
        else:  # a bug here must cost one connection, not the loop's attention
            log.error("closing %r after an unexpected error", self, exc_info=exc)
            self.abort(f"internal error: {exc!r}", False)

    # -- reading lent to another thread (any thread) ----------------------------------------------

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed), for the selector of a thread reading a lent link."""
        return self._sock.fileno()

    @property
    def can_lend(self) -> bool:
        """Whether ``lend_reading`` may be used: an open link without TLS (an SSL object must not
        be read by one thread while another writes to it)."""
        return self.state is _OPEN and not isinstance(self._sock, ssl.SSLSocket)

    def lend_reading(self) -> bool:
        """From now on the calling side reads this link, with ``read_lent`` when its socket is
        readable; the IO thread stops reading it (it keeps writing it). False: not lendable.

        A thread that reads lent links saves the hand-off from the IO thread: the kernel
        wakes it, and it handles the frames itself (executor links: read by a member's task
        threads, and by the executor's waiting caller at the other end).
        """
        with self._read_lock:
            if not self.can_lend:
                return False
            self._lent = True  # the IO thread drops its read interest when it next sees the socket
            return True

    def take_back_reading(self) -> None:
        """The IO thread reads this link again (undoes ``lend_reading``)."""
        with self._read_lock:
            if self._lent:
                self._lent = False
                self.driver.call_soon(self._update_interest)

    def read_lent(self) -> bool:
        """Read what has arrived on a lent link and handle its frames, on the calling thread.

        Returns False when the link is no longer lent or is closed (a failed read closes
        it, on the IO thread): stop watching it.
        """
        with self._read_lock:
            if not self._lent or self.state is not _OPEN:
                return False
            try:
                self._read()
            except Exception as exc:
                self._lent = False
                self.driver.call_soon(self._read_failed, exc)
                return False
            return self.state is _OPEN

    def _finish_connect(self) -> None:
        error = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            reason = f"cannot connect to {describe_remote(self.remote)}: {errno.errorcode.get(error, error)} ({os.strerror(error)})"
            self.abort(reason, True)
            return
        context = self.driver.client_tls
        if context is not None:
            self._set_state(State.TLS)
            self._sock = context.wrap_socket(self._sock, do_handshake_on_connect=False)
            self.driver.rewatch(self._sock, selectors.EVENT_WRITE | selectors.EVENT_READ, self._on_event)
            self._continue_tls()
            return
        self._begin_handshake()

    def _continue_tls(self) -> None:
        try:
            self._sock.do_handshake()
        except ssl.SSLWantReadError:
            self._events = selectors.EVENT_READ
            self.driver.rewatch(self._sock, self._events, self._on_event)
            return
        except ssl.SSLWantWriteError:
            self._events = selectors.EVENT_WRITE
            self.driver.rewatch(self._sock, self._events, self._on_event)
            return
        except (ssl.SSLError, OSError) as exc:
            self.driver.log_failure(self.remote, f"TLS handshake with {describe_remote(self.remote)} failed: {exc}")
            self.abort(f"TLS handshake failed: {exc}", True)
            return
        self._begin_handshake()

    def _begin_handshake(self) -> None:
        driver = self.driver
        self._set_state(State.HANDSHAKE)
        options = dict(cluster_id=driver.cluster_id, secret=driver.secret, info=driver.info,
                       plain_ok=self._plain_ok())
        try:
            if self.outbound:  # whom this socket really reached, whatever name was dialed
                self._handshake = security.ClientHandshake(
                    dialed=endpoint(self._sock.getpeername()), expect_uuid=self.expect_uuid, **options)
            else:  # where this side was reached
                self._handshake = security.ServerHandshake(reached_at=endpoint(self._sock.getsockname()), **options)
        except OSError as exc:  # the peer is gone already (ENOTCONN)
            raise ConnectionClosed(f"connection lost: {exc}") from exc
        self._update_interest()
        for kind, payload in self._handshake.start():
            self.send_frame(kind, payload)

    def _plain_ok(self) -> bool:
        """Whether this socket already guarantees the peer and its bytes, so frames may go without a MAC.

        TLS with the peer's certificate verified against the CA does; so does a Unix socket
        whose peer runs as this uid (members listen in an owner-only folder). Plain TCP never.
        """
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket):
            return sock.context.verify_mode == ssl.CERT_REQUIRED
        if sock.family == getattr(socket, "AF_UNIX", None) and hasattr(socket, "SO_PEERCRED"):
            try:
                _, uid, _ = _PEER_CREDENTIALS.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size))
            except OSError:
                return False
            return uid == os.getuid()
        return False

    def _read(self) -> None:
        # Reads go into buffers that are made once and reused: a fresh one per read (what
        # sock.recv does) costs an mmap, page faults and an munmap for every read, which is
        # more than the rest of a small frame's trip through this side.
        decoder = self._decoder
        target = None if isinstance(self._sock, ssl.SSLSocket) else decoder.receive_buffer()
        if target is not None:  # (a view taken and not released would pin the buffer, which grows as it fills)
            count = self._receive_into(target)
            self._traffic[0] += count
            frames = decoder.received_into(count)  # a large payload, in place
        else:
            inbox = self._inbox
            if inbox is None:
                inbox = self._inbox = bytearray(_RECV_SIZE)
            count = self._receive(inbox)
            if not count:
                return
            self._traffic[0] += count
            with memoryview(inbox) as view:  # the decoder copies what it keeps
                frames = decoder.feed(view[:count])
        if frames and decoder.large_frames != self._large_frames_seen and self._spares_timer is None:
            self._large_frames_seen = decoder.large_frames
            self._spares_timer = self.driver.call_later(_SPARES_IDLE, self._release_spares)
        while frames:
            for frame in frames:
                if self.state is _CLOSED:
                    return
                self._handle(frame)
            # During the handshake the decoder hands out one frame at a time, so that
            # what follows WELCOME is judged by the authenticated decoder: go on.
            frames = decoder.feed(b"") if decoder.buffered and self.state is not _CLOSED else []

    def _release_spares(self) -> None:
        """Let go of the buffers kept for large frames once none came for ``_SPARES_IDLE`` s."""
        with self._read_lock:  # the decoder may be a lent reader's right now
            decoder = self._decoder
            if decoder.large_frames != self._large_frames_seen and self.state is not State.CLOSED:
                self._large_frames_seen = decoder.large_frames
                self._spares_timer = self.driver.call_later(_SPARES_IDLE, self._release_spares)
                return
            self._spares_timer = None
            decoder.release_spares()

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

    def _receive(self, inbox: bytearray) -> int:
        """Read into ``inbox``: how many bytes came (0: nothing yet). Raises ConnectionClosed."""
        if not isinstance(self._sock, ssl.SSLSocket):
            try:
                count = self._sock.recv_into(inbox)
            except (BlockingIOError, InterruptedError):
                return 0
            except OSError as exc:
                raise ConnectionClosed(f"connection lost: {exc}") from exc
            if not count:
                raise ConnectionClosed("closed by the peer")
            return count
        # SSL_read gives one record (16 KiB) per call; read until it would block. Under
        # the lock: an SSL object must not read here while a caller thread writes to it.
        size = 0
        with self._lock, memoryview(inbox) as view:
            while size < _RECV_SIZE and self.state is not State.CLOSED:
                try:
                    count = self._sock.recv_into(view[size:])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    break
                except OSError as exc:
                    raise ConnectionClosed(f"connection lost: {exc}") from exc
                if not count:
                    if size:
                        break  # deliver what came first; the close is seen on the next read
                    raise ConnectionClosed("closed by the peer")
                size += count
            if self._sock.pending() and self.state is not State.CLOSED:
                # The rest of a record is decrypted and waiting inside OpenSSL while the kernel
                # socket may be empty, so select() would not report it: read on after this event.
                self.driver.defer(self._read_pending)
        return size

    def _read_pending(self) -> None:
        if self.state in (State.HANDSHAKE, State.OPEN):
            self._on_event(selectors.EVENT_READ)

    def _handle(self, frame: wire.Frame) -> None:
        if self.state is _HANDSHAKE:
            self._handshake_frame(frame)
        elif frame.kind == _RESPONSE:
            with self._lock:
                future = self._pending.pop(frame.request_id, None)
            if future is not None and future.set_running_or_notify_cancel():
                future.set_result(frame)
        elif self.state is _OPEN:
            self.driver.frame_received(self, frame)

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
            self.driver.log_failure(
                self.remote, f"handshake with {describe_remote(self.remote)} refused (by {side}): {reason}")
            self.abort(f"handshake failed: {reason}", by_peer, error=exc)
            return
        for kind, payload in replies:
            self.send_frame(kind, payload)
        if self._handshake.done:
            handshake = self._handshake
            self.peer_info = handshake.peer_info or {}
            self.frame_mac = handshake.frame_mac
            if handshake.frame_mac:  # WELCOME went out (or came in) without one: from here on, all frames
                self._sealer = wire.FrameSealer(handshake.send_key)
            self._decoder.authenticated(self.driver.max_payload,
                                        mac_key=handshake.receive_key if handshake.frame_mac else None)
            self._set_state(State.OPEN)
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            self._update_interest()
            self._announce()

    def _announce(self) -> None:
        if self.outbound:
            if self.opened.set_running_or_notify_cancel():
                self.opened.set_result(self)
            else:  # nobody wants it any more
                self.abort("connect was cancelled", False)
                return
        else:
            self.opened.set_running_or_notify_cancel()
            self.opened.set_result(self)
        self._announced = True
        self.driver.connection_opened(self)

    def _handshake_deadline(self) -> None:
        if self.state in (State.CONNECTING, State.TLS, State.HANDSHAKE):
            reason = f"handshake with {describe_remote(self.remote)} timed out after {self.driver.handshake_timeout} s"
            self.driver.log_failure(self.remote, reason)
            self.abort(reason, True, error=HandshakeError(reason))

    # -- closing (IO thread) -------------------------------------------------------------

    def abort(self, reason: str, by_peer: bool, *, error: Exception | None = None) -> None:
        """Close now, on the IO thread: queued output is dropped, ``opened`` and pending requests fail.

        Nothing happens if it is closed already. ``close()`` is the way from other threads.

        Args:
            reason: why, for the log and the errors.
            by_peer: the peer or the network ended it, not this side.
            error: what ``opened`` fails with; by default ConnectionClosed, or
                TransportError for an outbound connection.
        """
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
        with self._read_lock:  # after a lent reader's read in progress (it sees the state and stops)
            self._lent = False
            if self._spares_timer is not None:
                self._spares_timer.cancel()
                self._spares_timer = None
            self._decoder.release_spares()
        self.driver.unwatch(self._sock)
        self._sock.close()
        self.driver.forget(self)
        exc = error or ConnectionClosed(f"connection to {self.peer_info.get('address') or self.remote}: {reason}", by_peer=by_peer)
        if isinstance(exc, ConnectionClosed) and self.outbound:
            exc = TransportError(reason)
        _set_exception(self.opened, exc)
        for future in pending.values():
            _set_exception(future, ConnectionClosed(f"{reason} (request not answered)", by_peer=by_peer))
        if self._announced:
            self.driver.connection_closed(self)


_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_RESPONSE = Kind.RESPONSE  # (looking an enum member up costs more than comparing it)


def endpoint(address: tuple | str) -> str:
    """A socket address as the handshake names it: a Unix socket's path, or ``host:port``.

    An IPv6 scope and the IPv4-mapped prefix of a dual-stack socket are dropped, so the
    two ends of one TCP connection name it alike.
    """
    if isinstance(address, (str, bytes)):
        return os.fsdecode(address)
    host = address[0].split("%", 1)[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:"):]
    return format_address((host, address[1]))


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

