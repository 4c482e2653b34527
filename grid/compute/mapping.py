"""The lazy chunked map behind ``GridExecutor.map``, ``map_unordered`` and ``map_service``.

::

    items --islice--> chunk --executor.submit_task--> chunk Future --> (values, error, seconds)
      taken as results are consumed: at most        | done: _ChunkSizer learns the seconds per item
      _ChunkSizer.window() chunks ahead             v
                                                  ordered_results / unordered_results
                                                    yield the values, raise the error

A chunk is one task of kind ``CHUNK1`` (one iterable: the items themselves) or
``CHUNK`` (argument tuples); its member returns ``(values, error, seconds)``. With no
chunksize given, chunks grow from one item until each takes about ``_CHUNK_TARGET``
seconds on a member. Items are taken only as results are consumed, so ``map`` over an
endless iterable runs in bounded memory.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import math
import operator
import time
from concurrent.futures import Future

from .dispatch import MIN_CREDIT, credit_per_worker
from .protocol import CHUNK, CHUNK1

_CHUNK_TARGET = 0.01  # seconds a map chunk should take on a member
_MAX_CHUNK = 65536


def chunk_futures(executor, fn, iterables, chunksize, *, ordered=True, service=None):
    """Submit chunks to ``executor`` as the caller consumes; yield their futures (in order, or as completed)."""
    if chunksize is not None and chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    executor.check_open()
    function = executor.function_for(fn)
    # One iterable: chunks of the items themselves, no 1-tuples to build and pickle.
    kind, items = (CHUNK1, iter(iterables[0])) if len(iterables) == 1 else (CHUNK, zip(*iterables))
    sizer = _ChunkSizer(chunksize, _length_hint(iterables), executor)
    pending: collections.deque = collections.deque()
    exhausted = False

    def top_up():
        nonlocal exhausted
        window = sizer.window()
        while not exhausted and len(pending) < window:
            chunk = list(itertools.islice(items, sizer.size()))
            if not chunk:
                exhausted = True
                return
            future = executor.submit_task(fn, kind, chunk, None, None, function, service)
            future.items = len(chunk)
            future.add_done_callback(sizer.observe_future)  # result: (values, error, seconds)
            pending.append(future)

    top_up()  # start at once, like the stdlib's map; the rest as results are consumed

    def generate():
        try:
            while pending:
                if ordered:
                    future = pending.popleft()
                else:
                    done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    future = next(f for f in pending if f in done)
                    pending.remove(future)
                yield future
                top_up()
        finally:
            for future in pending:
                future.cancel()

    return generate()


def ordered_results(chunks, end: float | None):
    """The values of chunk futures, in order; each next one due by ``end`` (monotonic), if given."""
    try:
        for future in chunks:
            remaining = None if end is None else end - time.monotonic()
            values, error = future.result(remaining)[:2]
            yield from values
            if error is not None:
                raise error
    finally:
        chunks.close()


def unordered_results(executor, fn, iterables, chunksize):
    """The values of ``fn`` over ``iterables`` run on ``executor``, as their chunks complete."""
    chunks = chunk_futures(executor, fn, iterables, chunksize, ordered=False)
    try:
        for future in chunks:
            values, error = future.result()[:2]
            yield from values
            if error is not None:
                raise error
    finally:
        chunks.close()


class _ChunkSizer:
    """Chooses map chunk sizes from measured task times, and how many chunks to keep in flight."""

    def __init__(self, chunksize, length, executor):
        self.fixed = chunksize
        self.length = length
        self.executor = executor
        self.current = chunksize or 1
        self.per_item = None

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
            self.observe(getattr(future, "items", 0), future.result()[2])

    def observe(self, items: int, seconds: float) -> None:
        if items <= 0:
            return
        per_item = max(seconds / items, 1e-7)
        self.per_item = per_item if self.per_item is None else 0.7 * self.per_item + 0.3 * per_item
        if self.fixed:
            return
        ideal = _CHUNK_TARGET / self.per_item
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
