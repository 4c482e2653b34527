"""Distributed reduce: map and reduce chunks on the members, then combine the partial results by a tree
of reduces there; the caller gets one value, never the mapped items.

::

    executor.map_reduce(map_fn, reduce_fn, iterable, initial=...)
        chunks of the items (a range travels as sub-ranges: nothing is made here)
        level 0: a task per chunk, on the members:  reduce(reduce_fn, map(map_fn, chunk)) -> a partial
        level 1+: a task per FAN_IN partials, in order:  reduce(reduce_fn, partials) -> fewer
        ... until one is left; then reduce_fn(initial, it), here, if an initial was given

The result equals ``functools.reduce(reduce_fn, map(map_fn, iterable), initial)`` when ``reduce_fn``
is associative (sum, max, min, set union, list concatenation, ...): the chunks and the partials are
combined in their order, so it need not be commutative.
"""

from __future__ import annotations

import functools
import itertools

FAN_IN = 16  # partials one reduce task combines
_RANGE_CHUNKS = 64  # a range is cut into about this many chunks
_ITEMS_PER_CHUNK = 2_000  # any other iterable, into chunks of this many items
MISSING = object()  # (no initial value given)


def map_and_reduce(map_fn, reduce_fn, chunk):
    """(On a member) one chunk's partial result."""
    return functools.reduce(reduce_fn, map(map_fn, chunk))


def reduce_partials(reduce_fn, partials):
    """(On a member) several partial results, in order, as one."""
    return functools.reduce(reduce_fn, partials)


def chunks(iterable, chunksize: int | None):
    """The items in chunks: sub-ranges of a range, lists of anything else; never an empty chunk."""
    if isinstance(iterable, range):
        size = chunksize or max(1, -(-len(iterable) // _RANGE_CHUNKS))
        for start in range(0, len(iterable), size):
            yield iterable[start:start + size]
        return
    items = iter(iterable)
    size = chunksize or _ITEMS_PER_CHUNK
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield chunk


def map_reduce(executor, map_fn, reduce_fn, iterable, initial=MISSING, chunksize: int | None = None):
    """See ``GridExecutor.map_reduce``."""
    if not callable(map_fn) or not callable(reduce_fn):
        raise TypeError("map_reduce takes a map function and a reduce function (callables)")
    if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1):
        raise ValueError(f"chunksize is an int of 1 or more, or None, not {chunksize!r}")
    partials = list(executor.map(functools.partial(map_and_reduce, map_fn, reduce_fn), chunks(iterable, chunksize),
                                 chunksize=1))
    while len(partials) > 1:
        groups = [partials[start:start + FAN_IN] for start in range(0, len(partials), FAN_IN)]
        partials = list(executor.map(functools.partial(reduce_partials, reduce_fn), groups, chunksize=1))
    if not partials:
        if initial is MISSING:
            raise TypeError("reduce() of empty iterable with no initial value")
        return initial
    return partials[0] if initial is MISSING else reduce_fn(initial, partials[0])
