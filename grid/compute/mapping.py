"""The lazy chunked map behind ``GridExecutor.map``, ``map_unordered`` and ``map_service``.

::

    items --islice--> chunk --executor.submit_task--> chunk Future --> (values, error, seconds, bytes)
      taken as results are consumed: at most        | done: _ChunkSizer learns the seconds per item
      _ChunkSizer.window() chunks ahead             v
                                                  map_results yields the values, raises the error

A chunk is one task of kind ``CHUNK1`` (one iterable: the items themselves) or
``CHUNK`` (argument tuples); its member returns ``(values, error, seconds)``, and the
Future gets the bytes its arguments and values took too. With no chunksize given, chunks
grow from one item until each takes about ``_CHUNK_TARGET`` seconds on a member, or
its arguments and values take about ``FRAME_BYTES`` (large items go one per chunk, so
they stream: a member starts on the first while the next travel). Items are taken only as results are consumed, so ``map`` over an
endless iterable runs in bounded memory.

Every item given to ``map`` runs, as with the stdlib's eager ``Executor.map``, though
ours submits lazily (``MapRun``):

- a map dropped or closed before its first result was asked for runs to the end in
  the background (a "grid-map" thread), its results discarded;
- one closed (or dropped) after that cancels what has not started, as the stdlib's does;
- ``shutdown`` (and interpreter exit) waits for every open map to finish, submitting
  its remaining items past the shutdown; a map still held keeps its results for the
  caller to read afterwards (``with executor: results = executor.map(...)`` works).
  ``shutdown(cancel_futures=True)`` cancels their chunks that have not started instead.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import math
import operator
import threading
import time
import weakref
from concurrent.futures import Future

from .dispatch import MIN_CREDIT, credit_per_worker
from .protocol import CHUNK, CHUNK1, FRAME_BYTES

_CHUNK_TARGET = 0.01  # seconds a map chunk should take on a member
_SLICED = (range, list, tuple)  # map's one iterable of these types is sliced into chunks
_MAX_CHUNK = 65536


class MapRun:
    """One map's chunks: submitted a bounded window ahead of the consumer, and its state.

    The executor keeps every open run (``map_opened``/``map_closed``) so that ``shutdown``
    can finish them (``drain``). ``map_results`` makes the caller's iterator over it.
    """

    def __init__(self, executor, fn, iterables, chunksize, *, ordered: bool = True, service=None):
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        executor.check_open()
        self._executor = executor
        self._fn = fn
        self._function = executor.function_for(fn)
        # One iterable: chunks of the items themselves, no 1-tuples to build and pickle. A range,
        # list or tuple is sliced (in C; a range's chunk is a range, a few bytes on the wire),
        # anything else is iterated.
        self._kind, self._items = (CHUNK1, iter(iterables[0])) if len(iterables) == 1 else (CHUNK, zip(*iterables))
        self._sequence = iterables[0] if len(iterables) == 1 and type(iterables[0]) in _SLICED else None
        self._position = 0
        self._ordered = ordered
        self._service = service
        self._sizer = _ChunkSizer(chunksize, _length_hint(iterables), executor)
        self.lock = threading.RLock()  # one step at a time: the caller's next(), a drain's
        self._pending: collections.deque = collections.deque()  # chunk Futures submitted, not yet taken
        self._ready: collections.deque = collections.deque()  # (values, error) taken by a drain, kept
        self._exhausted = False  # every item was submitted
        self.started = False  # the caller asked for a result
        self.finished = False  # closed, or every result taken
        self.keep = True  # a drain keeps the results for the caller (False: nobody will read them)
        self._past_shutdown = False  # shutdown began with this map open: its items still go out
        self.finalizer = None  # set by map_results: calls dropped() when the caller lets go
        executor.map_opened(self)
        try:
            self._top_up()  # start at once, like the stdlib's map; the rest as results are consumed
        except BaseException:
            self.close()
            raise

    def _top_up(self) -> None:
        window = self._sizer.window()
        while not self._exhausted and len(self._pending) < window:
            if self._sequence is not None:
                start = self._position
                self._position = start + self._sizer.size()
                chunk = self._sequence[start : self._position]
            else:
                chunk = list(itertools.islice(self._items, self._sizer.size()))
            if not chunk:
                self._exhausted = True
                return
            try:
                future = self._submit(chunk)
            except RuntimeError:
                if not self._past_shutdown:
                    raise
                future = self._submit(chunk)  # shutdown began between the two: it lets this map go on
            future.items = len(chunk)
            future.add_grid_callback(self._sizer.observe_future)  # result: (values, error, seconds, bytes)
            self._pending.append(future)

    def _submit(self, chunk) -> Future:
        return self._executor.submit_task(self._fn, self._kind, chunk, None, None, self._function, self._service,
                                          after_shutdown=self._past_shutdown)

    def next_chunk(self, end: float | None):
        """(Under the lock) the next chunk's ``(values, error)``, by ``end`` (monotonic) if given.

        Raises:
            StopIteration: no chunk is left.
            TimeoutError: ``end`` passed first.
        """
        if self._ready:
            return self._ready.popleft()
        if not self._pending:
            raise StopIteration
        return self._take(end)

    def _take(self, end: float | None):
        """(Under the lock) the next submitted chunk's ``(values, error)``; more items go out."""
        remaining = None if end is None else max(0.0, end - time.monotonic())
        if self._ordered:
            future = self._pending[0]
            if not future.done():
                self._executor.wait_any((future,), remaining)
                if not future.done():
                    raise TimeoutError()
            self._pending.popleft()  # taken, even if it failed: the next call goes on with the next one
            values, error = future.result()[:2]
        else:
            self._executor.wait_any(self._pending, remaining)
            future = next((f for f in self._pending if f.done()), None)
            if future is None:
                raise TimeoutError()
            self._pending.remove(future)
            values, error = future.result()[:2]
        self._top_up()
        return values, error

    def past_shutdown(self) -> None:
        """Shutdown began: the items not yet submitted still are (they were given to ``map``).

        Called under the executor's lock as shutdown begins, so it takes no lock of its own."""
        self._past_shutdown = True

    def drain(self) -> None:
        """Run the map to the end without a consumer: every item is submitted, every result taken
        (kept for the caller if ``keep``). Returns when nothing is left or the map was closed."""
        while True:
            with self.lock:
                if self.finished or not self._pending:
                    if not self.keep:
                        self.close()
                    return
                waiting = [self._pending[0]] if self._ordered else list(self._pending)
            self._executor.wait_any(waiting, None)
            with self.lock:
                if self.finished or not self._pending or (self._ordered and self._pending[0] is not waiting[0]):
                    continue  # the caller took it meanwhile
                try:
                    chunk = self._take(None)
                except concurrent.futures.CancelledError:  # cancelled by shutdown(cancel_futures) or abandon
                    self.close()
                    return
                except Exception as exc:  # the chunk failed (its members died, its result was unreadable)
                    chunk = ([], exc)  # the caller meets it where it reads; the other items still run
                    self._top_up()
                if self.keep:
                    self._ready.append(chunk)

    def cancel_rest(self) -> None:
        """``shutdown(cancel_futures=True)``: submit no more items and cancel the chunks that have not
        started; the caller still reads the results of those that did, then a ``CancelledError``."""
        with self.lock:
            self._exhausted = True
            pending = list(self._pending)
        for future in pending:
            future.cancel()
        self._executor.map_closed(self)

    def close(self) -> None:
        """Cancel what has not started, take nothing more; the executor forgets the run."""
        with self.lock:
            if self.finished:
                return
            self.finished = True
            pending, self._pending = self._pending, collections.deque()
            self._ready.clear()
        for future in pending:
            future.cancel()
        self._executor.map_closed(self)

    def dropped(self) -> None:
        """The caller closed its iterator, or let go of it: before any result was asked for, the
        map runs to the end in the background (the stdlib's would have); after, the rest is cancelled."""
        with self.lock:
            if self.finished:
                return
            if self.started:
                self.close()
                return
            self.keep = False
        self._executor.map_detached(self)


def map_results(run: MapRun, timeout: float | None):
    """The iterator ``map`` returns, over ``run``: values in order (or as completed), a task's
    error raised where iteration reaches it; ``timeout`` counts from this call.

    It is a ``MapIterator``: ``itertools.chain`` over the chunks' value lists, so an item costs
    what C iteration over a list costs (a generator's ``yield from`` resumed its frame per
    item). Its ``close()`` is a generator's. Dropped or closed before it was started, it leaves
    the run to finish in the background (``MapRun.dropped``); after, what has not started is
    cancelled.
    """
    end = None if timeout is None else time.monotonic() + timeout
    chunks = _chunks(run, end)
    results = MapIterator.from_iterable(chunks)
    results.chunks = chunks
    run.finalizer = weakref.finalize(results, run.dropped)
    run.finalizer.atexit = False  # at exit, shutdown finishes the run
    return results


class MapIterator(itertools.chain):
    """What ``map`` returns: an iterator over the results, closed as a generator is."""

    def close(self) -> None:
        """Stop: no more results; what has not started is cancelled (as a generator's close)."""
        self.chunks.close()
        for _ in self:  # (nothing: the closed chunks end it) leaves the chain exhausted
            pass


def _chunks(run: MapRun, end: float | None):
    """The chunks' value lists in turn; a chunk's error is raised after its values are taken."""
    run.started = True  # the first next(): the body starts
    try:
        while True:
            with run.lock:
                if run.finished:
                    return
                try:
                    values, error = run.next_chunk(end)
                except StopIteration:
                    return
            yield values
            if error is not None:
                raise error
    finally:  # exhausted, failed, timed out, or closed (by the caller, or as it was dropped)
        run.finalizer.detach()
        run.close()


class _ChunkSizer:
    """Chooses map chunk sizes from measured task times, and how many chunks to keep in flight."""

    def __init__(self, chunksize, length, executor):
        self.fixed = chunksize
        self.length = length
        self.executor = executor
        self.current = chunksize or 1
        self.per_item = None  # member seconds per item, moving average
        self.bytes_per_item = None  # bytes per item, arguments and values, moving average

    def size(self) -> int:
        if self.fixed:
            return self.fixed
        return self.current

    def window(self) -> int:
        """Chunks to keep submitted: twice what the members keep in flight of chunks this size.

        Sized from the chunk's expected time, not the links' credit, which lags while
        chunks grow: items submitted ahead stay bounded whatever the chunk size.
        """
        if not self.fixed:  # growing chunks aim at _CHUNK_TARGET each: two per task thread suffice
            return max(4, 2 * self.executor.task_threads() * MIN_CREDIT)
        seconds = None if self.per_item is None else self.per_item * self.size()
        return max(4, 2 * self.executor.task_threads() * credit_per_worker(seconds))

    def observe_future(self, future: Future) -> None:
        """A chunk's Future is done: learn from its member time (a failed chunk teaches nothing)."""
        if not future.cancelled() and future.exception() is None:
            result = future.result()
            self.observe(getattr(future, "items", 0), result[2], result[3])

    def observe(self, items: int, seconds: float, nbytes: int = 0) -> None:
        if items <= 0:
            return
        per_item = max(seconds / items, 1e-7)
        self.per_item = per_item if self.per_item is None else 0.7 * self.per_item + 0.3 * per_item
        bytes_per_item = nbytes / items
        self.bytes_per_item = bytes_per_item if self.bytes_per_item is None else \
            0.7 * self.bytes_per_item + 0.3 * bytes_per_item
        if self.fixed:
            return
        ideal = min(_CHUNK_TARGET / self.per_item, FRAME_BYTES / max(self.bytes_per_item, 1.0))
        limit = _MAX_CHUNK
        if self.length:
            members = max(1, self.executor.link_count())
            limit = max(1, min(limit, math.ceil(self.length / (4 * members))))
        self.current = int(max(1, min(ideal, 4 * self.current, limit)))


def _length_hint(iterables) -> int | None:
    hints = [operator.length_hint(iterable, -1) for iterable in iterables]
    if not hints or any(hint < 0 for hint in hints):
        return None
    return min(hints)
