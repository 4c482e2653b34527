"""Where the executor's Futures are completed: never on the IO thread, preferably by their waiter.

::

    the thread with the read turn      put(fn, *args): queued, and one thread told
    (a waiting caller, or grid-reader)   a caller waiting on one of the executor's Futures
      "results" from a member  ------>     (GridFuture.result, .exception, wait_any) takes it:
    IO thread                              it completes the Futures itself, its own among them
      a link closed / opened  -------->  or else the "grid-results" thread takes it
      the starve timer

Completing a Future runs its done-callbacks, which are user code, and unpickling a
result can run user code too (a class's ``__setstate__``, an import). So the thread that
reads a frame only decodes it and queues what it says (it completes plain results itself);
the work happens here. A caller that is waiting does that work on its own thread, and
while it has the read turn it reads the links itself: the member's reply wakes it directly,
with no hand-off from another thread.

A callback that blocks delays what the thread running it would complete next, as it
does in ``ProcessPoolExecutor`` (whose management thread runs them); it never delays
the IO thread, heartbeats or the executor's other sends. A callback may wait on another
of the executor's Futures: its thread helps while it waits, so that cannot deadlock.
"""

from __future__ import annotations

import _thread
import collections
import logging
import re
import threading
import time
from concurrent.futures import Future

log = logging.getLogger("grid.executor")


class _Waiter:
    """A caller waiting in ``Completions.wait``: woken by releasing its ``signal`` (held while it sleeps),
    or, while it reads the links (``reading``), by a signal of the link reader."""

    __slots__ = ("futures", "signal", "sleeping", "reading", "ident")

    def __init__(self, futures):
        self.futures = futures
        self.signal = _thread.allocate_lock()
        self.signal.acquire()
        self.sleeping = False
        self.reading = False
        self.ident = _thread.get_ident()

    def wake(self) -> bool:
        """(Under the queue's lock) True if it slept: ``Completions._release`` it then, after the lock."""
        if self.sleeping:
            self.sleeping = False
            return True
        return False


_GRACE = 0.002  # seconds the read turn stays free for a waiter before the grid-reader thread takes it


class Completions:
    """A queue of completion work run by waiting callers or by the ``grid-results`` thread.

    Given a ``reader`` (``net.lending.LinkReader``) holding the executor's links, one thread at a
    time has the turn to read them: a caller waiting for a result, so that the member's reply
    wakes it directly, with no hand-off from the IO thread. When no caller waits for a while
    (``_GRACE``), the ``grid-reader`` thread takes the turn, and gives it up to the next caller
    that waits. That thread runs no user code (it completes what the IO thread used to: plain
    results of Futures without user callbacks), so a callback that blocks the results thread
    never stops the results that ``wait`` and ``as_completed`` are waiting for.
    """

    def __init__(self, name: str = "grid-results", reader=None):
        self._lock = threading.Lock()
        self._work: collections.deque = collections.deque()
        self._idle = threading.Condition(self._lock)  # the results thread, waiting for work
        self._waiters: list[_Waiter] = []  # callers waiting here, first come first
        self._closed = False
        self._reader = reader
        self._turn = None  # who reads the links: a _Waiter, _READER, or None (free since _free_since)
        self._free_since = time.monotonic()
        self._turn_wanted = False  # a caller waits while the reader thread reads: it hands over
        self._turn_free = threading.Condition(self._lock)  # the reader thread, waiting for a free turn
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._reader_thread = None
        if reader is not None:
            self._reader_thread = threading.Thread(target=self._read_when_nobody_does, name="grid-reader",
                                                   daemon=True)
            self._reader_thread.start()

    def _release(self, waiter: _Waiter) -> None:
        """Wake ``waiter`` (after ``wake()`` said so, outside the lock)."""
        if not waiter.reading:
            waiter.signal.release()
        elif waiter.ident != _thread.get_ident():  # (on its own thread, it returns from its read anyway)
            self._reader.signal()

    def put(self, fn, *args) -> None:
        """Queue ``fn(*args)`` (any thread): a waiting caller runs it, or else the results thread."""
        woken = None
        with self._lock:
            self._work.append((fn, args))
            for waiter in self._waiters:
                if waiter.wake():
                    woken = waiter
                    break
            else:  # every waiter is busy (maybe in a callback that blocks): the results thread takes it
                self._idle.notify()
        if woken is not None:  # after the lock: it wakes to take the lock, which is free now
            self._release(woken)

    def wake_all(self) -> None:
        """Wake the waiters that wait for any Future (``futures=None``): what they wait for may hold now."""
        if self._waiters:
            with self._lock:
                woken = [waiter for waiter in self._waiters if waiter.futures is None and waiter.wake()]
            for waiter in woken:
                self._release(waiter)

    def completed(self, future) -> None:
        """``future`` is done (its done-callback says so): wake whoever waits here for it."""
        if self._waiters:  # (read without the lock: a waiter is listed before it looks at done())
            with self._lock:
                woken = [waiter for waiter in self._waiters
                         if (waiter.futures is None or future in waiter.futures) and waiter.wake()]
            for waiter in woken:
                self._release(waiter)

    def wait(self, futures, done, timeout: float | None) -> bool:
        """Run queued work on this thread until ``done()`` or ``timeout``; returns ``done()``.

        ``futures`` are what ``done`` looks at: GridFutures, whose first done-callback is
        ``completed``, so one completed elsewhere (failed, cancelled) wakes this thread;
        None: any of them.
        """
        if done():
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        lock = self._lock
        me = _Waiter(futures)
        with lock:
            self._waiters.append(me)
        reader = self._reader
        try:
            while True:
                ask = False
                with lock:
                    work = self._work.popleft() if self._work else None
                    if work is not None:
                        if self._work and not self._closed:  # more: the results thread takes some too
                            self._idle.notify()
                    elif done():
                        return True
                    else:
                        me.sleeping = True
                        if reader is not None and not self._closed and reader.lent:
                            if self._turn is None:  # this thread reads the links while it waits
                                self._turn = me
                            elif self._turn is _READER and not self._turn_wanted:
                                self._turn_wanted = ask = True  # the reader thread hands it over
                        elif self._turn is me:  # closed: nobody reads any more
                            self._turn = None
                        me.reading = self._turn is me
                if work is not None:
                    self._call(*work)
                    if done():
                        return True
                    continue
                if ask:
                    reader.signal()
                remaining = None if deadline is None else deadline - time.monotonic()
                if me.reading:
                    if remaining is None or remaining > 0:
                        reader.wait(remaining)  # frames handled here; a wake-up is a signal of the reader
                    with lock:
                        me.reading = False
                        if not me.sleeping:  # woken: go and look
                            continue
                        if remaining is None or deadline - time.monotonic() > 0:
                            me.sleeping = False
                            continue
                        me.sleeping = False  # nobody woke it and time is up: it stops waiting
                        return done()
                if remaining is None:
                    me.signal.acquire()
                elif remaining <= 0 or not me.signal.acquire(timeout=remaining):
                    with lock:
                        if me.sleeping:  # nobody woke it: it stops waiting
                            me.sleeping = False
                            return done()
                    me.signal.acquire()  # woken just now: take the signal back
        finally:
            with lock:
                self._waiters.remove(me)
                me.reading = False
                gave_turn = self._turn is me
                if gave_turn:
                    self._turn = None
                    self._free_since = time.monotonic()
                left = bool(self._work)
                heir = next((waiter for waiter in self._waiters if waiter.wake()), None) if left or gave_turn else None
                if left and heir is None and not self._closed:  # left behind: the results thread's
                    self._idle.notify()
            if heir is not None:  # (it takes the turn, if it is free, when it looks again)
                heir.signal.release()

    def close(self) -> None:
        """Run what is queued, then stop the results thread (joined unless this is it). The link
        reader is stopped: nobody reads the links any more."""
        with self._lock:
            self._closed = True
            self._idle.notify()
            self._turn_free.notify()
        if self._reader is not None:
            self._reader.stop()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        if self._reader_thread is not None and threading.current_thread() is not self._reader_thread:
            self._reader_thread.join()

    def _run(self) -> None:
        lock = self._lock
        with lock:
            while True:
                while not self._work and not self._closed:
                    self._idle.wait()
                if not self._work:
                    return
                fn, args = self._work.popleft()
                lock.release()
                try:
                    self._call(fn, args)
                finally:
                    fn = args = None  # nothing of it (results, arguments) stays alive while this thread waits
                    lock.acquire()

    def _read_when_nobody_does(self) -> None:
        """The reader thread: it reads the links while no caller has for ``_GRACE`` seconds."""
        reader = self._reader
        with self._lock:
            while not self._closed:
                if not reader.lent:  # no link to read yet (or none that can be lent: TLS)
                    self._turn_free.wait()
                elif self._turn is None and time.monotonic() - self._free_since >= _GRACE:
                    self._read_links(reader)
                else:  # a caller reads, or the turn is free for a caller a little longer: look again then
                    self._turn_free.wait(_GRACE if self._turn is None else 2.5 * _GRACE)

    def links_lent(self) -> None:
        """A link was lent to the reader (any thread): the reader thread reads it while no caller does."""
        with self._lock:
            self._turn_free.notify()

    def _read_links(self, reader) -> None:
        """(Under the lock, released meanwhile) read the links until a caller wants the turn, or
        the queue closes."""
        self._turn = _READER
        try:
            while not self._turn_wanted and not self._closed:
                self._lock.release()
                try:
                    reader.wait()
                except Exception:  # a grid bug: the turn goes back, the thread lives on
                    log.exception("reading the executor's links failed")
                finally:
                    self._lock.acquire()
        finally:
            self._turn = None
            self._turn_wanted = False
            self._free_since = time.monotonic()  # the caller that wanted it takes it now (woken below)
            heir = next((waiter for waiter in self._waiters if waiter.wake()), None)
            if heir is not None:
                heir.signal.release()

    @staticmethod
    def _call(fn, args) -> None:
        try:
            fn(*args)
        except Exception:  # a grid bug: it costs these results, not the thread
            log.exception("completing tasks failed in %s", getattr(fn, "__qualname__", fn))


_READER = "reader thread"  # Completions._turn while the grid-reader thread reads the links


class GridFuture(Future):
    """A ``concurrent.futures.Future`` whose waiter completes the executor's Futures while it waits.

    Everything else is the stdlib's: ``wait``, ``as_completed`` and callbacks work as with
    any Future (they are served by the results thread).
    """

    __slots__ = ("user_callbacks",)
    _completions: Completions | None = None  # set per executor on a subclass (see future_class)

    def __init__(self):
        super().__init__()
        self.user_callbacks = False  # the IO thread may complete it only while none was added
        Future.add_done_callback(self, self._completions.completed)  # however it ends, its waiter wakes

    def add_done_callback(self, fn):
        """The stdlib's; a Future given a callback is completed off the IO thread (it runs user code)."""
        self.user_callbacks = True
        super().add_done_callback(fn)

    def add_grid_callback(self, fn) -> None:
        """A callback of grid's own, quick and safe on the IO thread (``add_done_callback`` is the user's)."""
        Future.add_done_callback(self, fn)

    def result(self, timeout=None):
        self._completions.wait((self,), self.done, timeout)
        return super().result(None if timeout is None else 0)  # done, or the helping timed out: no more waiting

    def exception(self, timeout=None):
        self._completions.wait((self,), self.done, timeout)
        return super().exception(None if timeout is None else 0)


def future_class(completions: Completions) -> type:
    """A ``GridFuture`` subclass bound to ``completions`` (one per executor)."""
    return type("GridFuture", (GridFuture,), {"__slots__": (), "_completions": completions,
                                              "__module__": __name__, "__qualname__": "GridFuture"})


def wait_any(completions: Completions, futures, timeout: float | None) -> None:
    """Return when one of ``futures`` is done or ``timeout`` passes, helping meanwhile."""
    futures = set(futures)
    completions.wait(futures, lambda: any(future.done() for future in futures), timeout)


# Pickle opcodes that call or look up something (a class, a reducer, a persistent id): a
# pickle without any of these bytes, anywhere, only builds plain data (None, bools, numbers,
# strings, bytes, and tuples, lists, dicts and sets of them), so unpickling it runs no user
# code. Bytes that merely look like one (inside a string) only send it the slower way.
_CALLS_CODE = re.compile(rb"[cRbioPQ\x81\x82\x83\x84\x92\x93]")


def plain(pickled) -> bool:
    """Whether unpickling ``pickled`` surely runs no user code (see ``_CALLS_CODE``)."""
    return _CALLS_CODE.search(pickled, 2) is None  # after PROTO n: its n may be any byte
