"""DQueue: a FIFO queue kept wholly in the partition of its name, ``queue.Queue``-like wherever a queue
stored elsewhere can be, with Hazelcast IQueue's ``offer``/``poll``/``peek``/``drain`` besides.

::

    queue.put(item) --dumps(item)--> Op(QUEUE, name, "offer", (data, maxsize), call id) --> backend.execute(p, op)
    queue.get()     --------------> Op(QUEUE, name, "poll", (1,), call id) --> [data] or [] --loads--> item
    blocking:  try; if it could not (empty, full), backend.wait_for_change(p, seen, remaining); try again
    backend:   anything with ``partitions``, ``execute(partition, op)`` and ``wait_for_change``;
               ``store.LocalBackend`` runs the replicas in this process (tests, one-process use)

Items are pickled here and unpickled here; members keep the bytes. Every write carries a call id, so
a retry after a failover applies once: each item put arrives once, and each is got once. A replica
remembers a write's result by its call id even when it changed nothing, so every try of a blocking
``get`` or ``put`` is a new call with a new id; only a resend of the same try reuses it.
"""

from __future__ import annotations

import pickle
import queue
import sys
import time
from collections.abc import Iterable

from ..cluster.partitions import partition_of
from ..net import serialize
from .store import QUEUE, CallIds, Fenced, Op, StoreError

_ALL = sys.maxsize  # drain's "every item": the store takes min(max_items, size)


class DQueue:
    """A distributed FIFO queue named ``name``; make one with ``cluster.get_queue(name)``.

    It does what ``queue.Queue`` does (``put``/``get`` with ``block`` and ``timeout``, ``queue.Full``
    and ``queue.Empty``, ``task_done``/``join``), and ``len()`` and truth as a deque's: an empty
    queue is false.

    ``maxsize`` bounds the queue for this handle (<= 0: no bound). The store checks the bound that
    each put brings, so two handles on one name with different ``maxsize`` share the items but not
    the bound: a handle's put waits (or fails) only while the queue holds ``maxsize`` of its own or
    more, and an unbounded handle can always put, past another's bound.
    """

    def __init__(self, name: str, backend, maxsize: int = 0):
        if not isinstance(name, str) or not name:
            raise TypeError(f"a queue's name is a non-empty str, not {name!r}")
        if type(maxsize) is not int:  # bool is an int, and no size
            raise TypeError(f"a queue's maxsize is an int (<= 0 for no bound), not {maxsize!r}")
        self.name = name
        self._backend = backend
        self._maxsize = maxsize
        self._partition = partition_of(name, backend.partitions)
        self._calls = CallIds()

    def __repr__(self) -> str:
        return f"<DQueue {self.name!r} maxsize={self._maxsize}>"

    @property
    def maxsize(self) -> int:
        """This handle's bound on the queue's size; <= 0 for none."""
        return self._maxsize

    on_destroy = None  # set by the cluster handle: the catalog forgets the name

    def destroy(self) -> None:
        """Remove the queue and its items cluster-wide (a later put starts it again, empty)."""
        self._write("destroy")
        if self.on_destroy is not None:
            self.on_destroy()

    # -- plumbing ------------------------------------------------------------------------------------

    def _read(self, action: str):
        return self._backend.execute(self._partition, Op(QUEUE, self.name, action))

    def _write(self, action: str, *args):
        return self._backend.execute(self._partition, Op(QUEUE, self.name, action, args, self._calls.next()))

    def _offer(self, data: bytes) -> bool:
        return self._write("offer", data, self._maxsize)

    def _poll(self) -> list:
        return self._write("poll", 1)

    def _until(self, attempt, timeout: float | None):
        """``attempt()`` until it returns something true, waiting for a change of the partition between
        tries, for ``timeout`` seconds at most (None: no limit); its last result."""
        if timeout == 0:
            return attempt()
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = self._backend.wait_for_change(self._partition)  # before the try: a change after it wakes us
        while True:
            result = attempt()
            if result:
                return result
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return result
            seen = self._backend.wait_for_change(self._partition, seen, remaining)

    @staticmethod
    def _timeout(timeout: float | None) -> float | None:
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        return timeout

    @staticmethod
    def _dumps(item) -> bytes:
        return serialize.dumps(item)  # SerializationError (a TypeError) before anything is sent

    # -- queue.Queue -----------------------------------------------------------------------------------

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        """Put ``item`` at the tail, waiting for room if the queue is full (as ``queue.Queue.put``).

        Raises:
            queue.Full: no room, and ``block`` is false or ``timeout`` seconds passed.
            ValueError: ``timeout`` is negative (with ``block``).
            TypeError: ``item`` cannot be pickled (``serialize.SerializationError``); nothing is sent.
        """
        wait = self._timeout(timeout) if block else 0
        data = self._dumps(item)
        if not self._until(lambda: self._offer(data), wait):
            raise queue.Full

    def put_nowait(self, item) -> None:
        """``put(item, block=False)``: queue.Full when there is no room."""
        self.put(item, block=False)

    def get(self, block: bool = True, timeout: float | None = None):
        """Remove and return the item at the head, waiting for one if the queue is empty.

        Raises:
            queue.Empty: no item, and ``block`` is false or ``timeout`` seconds passed.
            ValueError: ``timeout`` is negative (with ``block``).
        """
        wait = self._timeout(timeout) if block else 0
        taken = self._until(self._poll, wait)
        if not taken:
            raise queue.Empty
        return pickle.loads(taken[0])

    def get_nowait(self):
        """``get(block=False)``: queue.Empty when there is no item."""
        return self.get(block=False)

    def qsize(self) -> int:
        """The items in the queue now (another client may change it the moment after)."""
        return self._read("size")

    def __len__(self) -> int:
        return self._read("size")

    def empty(self) -> bool:
        return self._read("size") == 0

    def full(self) -> bool:
        """True if the queue holds this handle's ``maxsize`` items or more (never without a bound)."""
        return 0 < self._maxsize <= self._read("size")

    def task_done(self) -> None:
        """Mark one item got earlier as processed, for ``join`` (as ``queue.Queue.task_done``).

        Raises:
            ValueError: called more times than items were put.
        """
        try:
            self._write("task_done")
        except Fenced:
            raise
        except StoreError as exc:
            raise ValueError(str(exc)) from exc  # "task_done() called too many times"

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every item ever put has been marked with ``task_done``, by any client.

        Unlike ``queue.Queue.join`` it takes a timeout and says how it ended.

        Returns:
            True when no item is unfinished; False when ``timeout`` seconds passed first.

        Raises:
            ValueError: ``timeout`` is negative.
        """
        return self._until(lambda: self._read("unfinished") == 0, self._timeout(timeout))

    # -- beyond queue.Queue (Hazelcast's IQueue) ---------------------------------------------------------

    def offer(self, item, timeout: float | None = 0) -> bool:
        """Put ``item`` if there is room, waiting up to ``timeout`` seconds for it (None: no limit).

        Returns:
            True if it was put, False if there was no room in time.

        Raises:
            ValueError: ``timeout`` is negative.
            TypeError: ``item`` cannot be pickled; nothing is sent.
        """
        wait = self._timeout(timeout)
        data = self._dumps(item)
        return self._until(lambda: self._offer(data), wait)

    def poll(self, timeout: float | None = 0, default=None):
        """Remove and return the head item, waiting up to ``timeout`` seconds for one (None: no limit);
        ``default`` when none came in time.

        Raises:
            ValueError: ``timeout`` is negative.
        """
        taken = self._until(self._poll, self._timeout(timeout))
        return pickle.loads(taken[0]) if taken else default

    def peek(self, default=None):
        """The head item, left in the queue; ``default`` if the queue is empty."""
        data = self._read("peek")
        return default if data is None else pickle.loads(data)

    def drain(self, max_items: int | None = None) -> list:
        """Remove and return up to ``max_items`` items (None: all), head first, in one operation.

        Raises:
            ValueError: ``max_items`` is negative.
        """
        if max_items is None:
            max_items = _ALL
        elif type(max_items) is not int:
            raise TypeError(f"max_items is an int or None, not {max_items!r}")
        elif max_items < 0:
            raise ValueError(f"max_items must not be negative, not {max_items}")
        if max_items == 0:
            return []
        return [pickle.loads(data) for data in self._write("poll", max_items)]

    def put_all(self, items: Iterable) -> int:
        """Put as many of ``items`` as there is room for now, in order, in one operation; no waiting.

        Returns:
            How many were put: the first that many of ``items`` are at the tail of the queue, the
            rest are not in it (all of them without a bound).

        Raises:
            TypeError: an item cannot be pickled; nothing is sent.
        """
        datas = tuple(self._dumps(item) for item in items)
        if not datas:
            return 0
        return self._write("offer_all", datas, self._maxsize)

    def clear(self) -> int:
        """Remove every item; returns how many there were.

        The items removed were never got and will never be done, so ``join`` stops waiting for
        them; items got before and not yet ``task_done`` still count.
        """
        return self._write("clear")
