"""Where the executor's Futures are completed: never on the IO thread, preferably by their waiter.

::

    IO thread                          put(fn, *args): queued, and one thread told
      "results" from a member  ------>   a caller waiting on one of the executor's Futures
      a link closed / opened               (GridFuture.result, .exception, wait_any) takes it:
      the starve timer                     it completes the Futures itself, its own among them
                                         or else the "grid-results" thread takes it

Completing a Future runs its done-callbacks, which are user code, and unpickling a
result can run user code too (a class's ``__setstate__``, an import). So the IO thread
only decodes a frame and queues what it says; the work happens here. A caller that is
waiting does that work on its own thread, so a round trip costs no more hand-offs than
a wake-up on the IO thread already did: the member's reply wakes the waiter directly.

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
    """A caller waiting in ``Completions.wait``: woken by releasing its ``signal`` (held while it sleeps)."""

    __slots__ = ("futures", "signal", "sleeping")

    def __init__(self, futures):
        self.futures = futures
        self.signal = _thread.allocate_lock()
        self.signal.acquire()
        self.sleeping = False

    def wake(self) -> bool:
        """(Under the queue's lock) True if it slept: release ``signal`` then, after the lock."""
        if self.sleeping:
            self.sleeping = False
            return True
        return False


class Completions:
    """A queue of completion work run by waiting callers or by the ``grid-results`` thread."""

    def __init__(self, name: str = "grid-results"):
        self._lock = threading.Lock()
        self._work: collections.deque = collections.deque()
        self._idle = threading.Condition(self._lock)  # the results thread, waiting for work
        self._waiters: list[_Waiter] = []  # callers waiting here, first come first
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

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
            woken.signal.release()

    def wake_all(self) -> None:
        """Wake the waiters that wait for any Future (``futures=None``): what they wait for may hold now."""
        if self._waiters:
            with self._lock:
                woken = [waiter for waiter in self._waiters if waiter.futures is None and waiter.wake()]
            for waiter in woken:
                waiter.signal.release()

    def completed(self, future) -> None:
        """``future`` is done (its done-callback says so): wake whoever waits here for it."""
        if self._waiters:  # (read without the lock: a waiter is listed before it looks at done())
            with self._lock:
                woken = [waiter for waiter in self._waiters
                         if (waiter.futures is None or future in waiter.futures) and waiter.wake()]
            for waiter in woken:
                waiter.signal.release()

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
        try:
            while True:
                with lock:
                    work = self._work.popleft() if self._work else None
                    if work is not None:
                        if self._work and not self._closed:  # more: the results thread takes some too
                            self._idle.notify()
                    elif done():
                        return True
                    else:
                        me.sleeping = True
                if work is not None:
                    self._call(*work)
                    if done():
                        return True
                    continue
                if deadline is None:
                    me.signal.acquire()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not me.signal.acquire(timeout=remaining):
                        with lock:
                            if me.sleeping:  # nobody woke it: it stops waiting
                                me.sleeping = False
                                return done()
                        me.signal.acquire()  # woken just now: take the signal back
        finally:
            with lock:
                self._waiters.remove(me)
                left = bool(self._work)
                heir = next((waiter for waiter in self._waiters if waiter.wake()), None) if left else None
                if left and heir is None and not self._closed:  # left behind: the results thread's
                    self._idle.notify()
            if heir is not None:
                heir.signal.release()

    def close(self) -> None:
        """Run what is queued, then stop the results thread (joined unless this is it)."""
        with self._lock:
            self._closed = True
            self._idle.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

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

    @staticmethod
    def _call(fn, args) -> None:
        try:
            fn(*args)
        except Exception:  # a grid bug: it costs these results, not the thread
            log.exception("completing tasks failed in %s", getattr(fn, "__qualname__", fn))


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
