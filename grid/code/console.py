"""The remote console: an interactive Python session on one member, over an authenticated link.

::

    client (python -m grid console)             member (ConsoleSessions, one per Peer)
    -------------------------------             --------------------------------------
    RemoteConsole.push(line) ---console.push---> IO thread: queue the source for the session
         waits on its events queue                 session thread "grid-console-N":
         <-------------- console.output -----------  runsource() in module `user`; what it
         <-------------- RESPONSE {more, ended} ---  prints is sent back as it is written

The client half is ``console_client.py``. The client keeps the lines of an unfinished block and sends the whole block each
time (``code.InteractiveConsole.push`` semantics, with the buffer on the client),
so Ctrl-C on the client just forgets the block and the member holds no input state.
Code runs on the session's own thread, never on the IO thread. Only that thread's
``sys.stdout``/``sys.stderr`` go to the console (a thread-aware proxy, installed once);
other threads of the member still print to the member's real streams.
"""

from __future__ import annotations

import code
import ctypes
import io
import itertools
import logging
import os
import queue
import socket
import sys
import threading
import types
from concurrent.futures import Future

from ..errors import CodeNotAllowed, GridError
from ..net import messaging
from ..net.address import format_address
from . import patches

log = logging.getLogger("grid.console")

CONSOLE_MODULE = "user"  # the namespace a console session runs in (exec_all's default module)
_OUTPUT_CHUNK = 64 * 1024  # characters per console.output message
_OUTPUT_EAGER = 4096  # send buffered output at once past this size, even without a newline
_CLOSE_JOIN_SECONDS = 2.0  # how long close() waits for a session stuck in C code


class ConsoleSessions:
    """The console sessions of one member: ``console.open|push|interrupt|close`` handlers.

    Args:
        router: the member's ``messaging.Router``; the handlers are registered on it.
        allow_code: False makes every console request fail with ``CodeNotAllowed``.
        member: this member (its address, pid and host name go into the banner).
        link_check_interval: seconds between checks of an idle session's client link;
            a session whose link closed ends within about this time.
    """

    def __init__(self, router, *, allow_code: bool, member, link_check_interval: float = 2.0):
        self.allow_code = allow_code
        self.member = member
        self.link_check_interval = link_check_interval
        self._sessions: dict[int, _Session] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False
        router.register("console.open", self._on_open)
        router.register("console.push", self._on_push)
        router.register("console.interrupt", self._on_interrupt)
        router.register("console.close", self._on_close_request)

    @property
    def active(self) -> int:
        """How many sessions are open now."""
        with self._lock:
            return len(self._sessions)

    def close(self) -> None:
        """End every session: interrupt code that is running and join the session threads.

        A session stuck in C code (a long ``time.sleep``, a blocking socket call) cannot be
        interrupted; after a short wait it is logged and left to die with the process.
        """
        with self._lock:
            self._closed = True
            sessions = list(self._sessions.values())
            threads, self._threads = self._threads, []
        for session in sessions:
            session.stop(interrupt=True)
        for thread in threads:
            thread.join(_CLOSE_JOIN_SECONDS)
            if thread.is_alive():
                log.warning("console thread %s is still running code that cannot be interrupted (blocked in "
                            "C code); leaving it to end with the process", thread.name)
        for session in sessions:
            self._forget(session)

    # -- IO thread --------------------------------------------------------------------------------

    def _check_allowed(self) -> None:
        if not self.allow_code:
            raise CodeNotAllowed(
                f"member {format_address(self.member.address)} runs with allow_code = false, so it refuses "
                "console sessions; set `allow_code = true` in that member's config and restart it, or "
                "open the console on a member that allows code")

    def _session(self, conn, body) -> _Session:
        self._check_allowed()
        session_id = body.get("session") if isinstance(body, dict) else None
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.conn is not conn:
            raise GridError(f"no console session {session_id!r} on this link (it ended or was never "
                            "opened); open a new console")
        return session

    def _on_open(self, conn, body) -> dict:
        self._check_allowed()
        with self._lock:
            if self._closed:
                raise GridError("this member is shutting down; open the console on another member")
            session_id = next(self._ids)
            session = _Session(session_id, conn, self)
            thread = threading.Thread(target=session.run, name=f"grid-console-{session_id}",
                                      # Daemon only so that code stuck in C cannot keep the process
                                      # alive at exit; close() joins it (see close()).
                                      daemon=True)
            session.thread = thread
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            self._sessions[session_id] = session
        _streams.acquire()
        thread.start()
        log.info("console session %d opened by %r", session_id, conn)
        return {
            "session": session_id,
            "address": format_address(self.member.address),
            "pid": os.getpid(),
            "hostname": getattr(self.member, "hostname", "") or socket.gethostname(),
            "python": sys.version.split()[0],
            "module": CONSOLE_MODULE,
        }

    def _on_push(self, conn, body) -> Future:
        session = self._session(conn, body)
        source = body.get("source")
        if not isinstance(source, str):
            raise GridError(f"console.push needs the source as a string, got {type(source).__name__}")
        result: Future = Future()
        session.inbox.put((source, result))
        return result

    def _on_interrupt(self, conn, body) -> bool:
        return self._session(conn, body).interrupt(KeyboardInterrupt)

    def _on_close_request(self, conn, body) -> None:
        session = self._session(conn, body)
        self._forget(session)
        session.stop(interrupt=False)

    def _forget(self, session: _Session) -> None:
        with self._lock:
            if self._sessions.get(session.session_id) is session:
                del self._sessions[session.session_id]
                released = True
            else:
                released = False
        if released:
            _streams.release()
            log.info("console session %d ended", session.session_id)


class _Session:
    """One console: its inbox, its thread, its interpreter over the ``user`` module."""

    def __init__(self, session_id: int, conn, owner: ConsoleSessions):
        self.session_id = session_id
        self.conn = conn
        self.owner = owner
        self.inbox: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.output = _SessionOutput(self)
        self._running_code = False
        self._interrupt_lock = threading.Lock()
        self._pending = []  # output text not sent yet
        self._link_lost = False
        self._current: Future | None = None  # the reply to the push being run

    # -- any thread -------------------------------------------------------------------------------

    def stop(self, *, interrupt: bool) -> None:
        self.inbox.put(None)
        if interrupt:
            self.interrupt(SystemExit)

    def interrupt(self, exception: type[BaseException]) -> bool:
        """Raise ``exception`` in the session thread if it is running console code now."""
        with self._interrupt_lock:
            if not self._running_code or self.thread is None:
                return False
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread.ident),
                                                       ctypes.py_object(exception))
            return True

    # -- the session thread -----------------------------------------------------------------------

    def run(self) -> None:
        _streams.bind(self)
        interpreter = _Interpreter(user_module().__dict__, self)
        try:
            while True:
                try:
                    if not self._serve_one(interpreter):
                        return
                except KeyboardInterrupt:  # an interrupt that landed just after the code ended
                    self._running_code = False
                    self._answer({"more": False, "ended": False, "exit_code": None})
        except SystemExit:  # close() stopped the session just after the code ended
            pass
        finally:
            self._answer({"more": False, "ended": True, "exit_code": None})
            _streams.unbind()
            self._fail_queued(GridError("the console session ended"))
            self.owner._forget(self)

    def _answer(self, reply: dict) -> None:
        """Send what was printed and the reply to the push being run, if it has none yet."""
        current, self._current = self._current, None
        self.flush()
        if current is not None and not current.done():
            current.set_result(reply)

    def _serve_one(self, interpreter: _Interpreter) -> bool:
        try:
            item = self.inbox.get(timeout=self.owner.link_check_interval)
        except queue.Empty:
            return self.conn.is_open
        if item is None:
            return False
        source, result = item
        if not result.set_running_or_notify_cancel():
            return True
        self._current = result
        ended, exit_code = False, None
        with self._interrupt_lock:
            self._running_code = True
        try:
            more = interpreter.runsource(source, "<console>")
        except SystemExit as exc:  # exit(), quit() or sys.exit() in the console ends the session
            more, ended, exit_code = False, True, _exit_code(exc)
        finally:
            with self._interrupt_lock:
                self._running_code = False
        self._answer({"more": bool(more), "ended": ended, "exit_code": exit_code})
        return not ended and not self._link_lost

    def _fail_queued(self, error: Exception) -> None:
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(error)

    def write(self, text: str) -> None:
        self._pending.append(text)
        if "\n" in text or sum(map(len, self._pending)) >= _OUTPUT_EAGER:
            self.flush()

    def flush(self) -> None:
        text, self._pending = "".join(self._pending), []
        if not text or self._link_lost:
            return
        for start in range(0, len(text), _OUTPUT_CHUNK):
            try:
                messaging.send(self.conn, "console.output",
                               {"session": self.session_id, "text": text[start:start + _OUTPUT_CHUNK]})
            except GridError:
                self._link_lost = True  # the client is gone; the session ends after this push
                return


class _Interpreter(code.InteractiveInterpreter):
    """``InteractiveInterpreter`` whose tracebacks go to the session, not to ``sys.stderr``."""

    def __init__(self, namespace: dict, session: _Session):
        super().__init__(namespace)
        self.session = session

    def write(self, data: str) -> None:
        self.session.write(data)


def _exit_code(exc: SystemExit) -> int | str | None:
    code_value = exc.code
    return code_value if code_value is None or isinstance(code_value, int) else str(code_value)


def user_module() -> types.ModuleType:
    """The module ``user`` from ``sys.modules`` (where exec_all runs), made if absent."""
    return patches.namespace(CONSOLE_MODULE)


class _SessionOutput(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a console thread: text goes to the session's client."""

    def __init__(self, session: _Session):
        self._session = session

    @property
    def encoding(self) -> str:
        return "utf-8"

    def writable(self) -> bool:
        return True

    def write(self, text) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._session.write(text)
        return len(text)

    def flush(self) -> None:
        self._session.flush()

    def close(self) -> None:
        pass  # exit() closes sys.stdin; nothing of a session may close the member's streams


class _SessionInput(io.TextIOBase):
    """``sys.stdin`` of a console thread: there is none, and ``input()`` says so."""

    @property
    def encoding(self) -> str:
        return "utf-8"

    def readable(self) -> bool:
        return True

    def readline(self, size=-1) -> str:
        raise EOFError("the grid console has no standard input; put the values in the code instead")

    def read(self, size=-1) -> str:
        return self.readline()

    def close(self) -> None:
        pass


_NO_INPUT = _SessionInput()


class _RoutedStream:
    """Stands in for ``sys.stdout``/``sys.stderr``/``sys.stdin``: a console thread gets its
    session's stream, every other thread the stream that was there before."""

    def __init__(self, name: str, original):
        self._name = name
        self.original = original

    def _target(self):
        session = getattr(_streams.local, "session", None)
        if session is not None:
            return _NO_INPUT if self._name == "stdin" else session.output
        return self.original

    def write(self, text):
        target = self._target()
        return target.write(text) if target is not None else len(text)

    def flush(self):
        target = self._target()
        if target is not None:
            target.flush()

    def __getattr__(self, name):
        return getattr(self._target(), name)

    def __iter__(self):
        return iter(self._target())

    def __repr__(self) -> str:
        return f"<grid console routing of sys.{self._name} (else {self.original!r})>"


class _StreamRouting:
    """Installs the routed streams while any console session exists; one per process."""

    _NAMES = ("stdout", "stderr", "stdin")

    def __init__(self):
        self.local = threading.local()
        self._lock = threading.Lock()
        self._users = 0

    def acquire(self) -> None:
        with self._lock:
            self._users += 1
            self._install()

    def release(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users:
                return
            for name in self._NAMES:  # put back what was there, unless someone replaced us since
                current = getattr(sys, name)
                if isinstance(current, _RoutedStream):
                    setattr(sys, name, current.original)

    def bind(self, session: _Session) -> None:
        self.local.session = session
        with self._lock:
            self._install()  # again: something (a test harness) may have swapped the streams since

    def unbind(self) -> None:
        self.local.session = None

    def _install(self) -> None:
        for name in self._NAMES:
            current = getattr(sys, name)
            if not isinstance(current, _RoutedStream):
                setattr(sys, name, _RoutedStream(name, current))


_streams = _StreamRouting()
