"""Code that runs where the data is: entry processors, queries and aggregations over a DMap.

::

    map.execute_on_key(k, fn, *args)  --> runner.on_key: a task on k's owner --> run_on_key there:
        read k (a local read: no hop) -> fn(entry, *args) -> a conditional write of what fn left
        (replace_if_same / put_if_absent / remove_if_same); another write came first -> read again
    map.select(pred) / aggregate(agg, pred) / execute_on_entries(fn, pred)
        --> runner.on_partitions: a task per owner, with the partitions it owns --> scan there:
        each partition's entries, unpickled in the task (never on an IO thread), filtered, folded
        per partition; the caller combines one result per partition (a partition whose task
        failed goes again, to its owner by the newer table)

A processor's write carries a call id made from the call's own id, the key and the attempt
number, so a task run again after its member died replays the same calls: each one applied
already answers with its stored result, and none applies twice. Under contention ``fn`` may run
more than once (as ``AtomicReference.updateAndGet`` does): keep it a function of the entry.

Predicates and aggregators' ``map`` take ``(key, value)``; processors take an ``Entry``. They
are Python callables, lambdas included (they travel with cloudpickle when it is installed).
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
from typing import Any

class _Absent:
    """No value (an absent entry, a partition that matched nothing): one object in every process."""

    def __reduce__(self):
        return "ABSENT"  # (pickled by name: it unpickles as this module's ABSENT)

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _ABSENT = _Absent()


class Entry:
    """A map entry as a processor sees it: ``.key``, ``.value`` (``None`` when absent), ``.exists``.

    Set ``entry.value = x`` to store ``x``; ``del entry.value`` removes the entry.
    """

    __slots__ = ("key", "_value", "_changed")

    def __init__(self, key, value=_ABSENT):
        self.key = key
        self._value = value
        self._changed = False

    @property
    def exists(self) -> bool:
        return self._value is not _ABSENT

    @property
    def value(self):
        return None if self._value is _ABSENT else self._value

    @value.setter
    def value(self, value) -> None:
        self._value = value
        self._changed = True

    @value.deleter
    def value(self) -> None:
        self._value = _ABSENT
        self._changed = True

    def __repr__(self) -> str:
        return f"Entry({self.key!r}, {self.value!r})" if self.exists else f"Entry({self.key!r}, absent)"


# -- aggregators ------------------------------------------------------------------------------------------


class Aggregator:
    """Folds entries: ``map(key, value)`` makes a piece per entry, ``combine(a, b)`` joins two pieces
    (on the members, per partition, then across partitions on the caller), and ``finish(piece)``
    makes the result; ``empty`` is the result when no entry matched."""

    def __init__(self, map, combine, finish=None, empty=None, name: str = "custom"):
        if not callable(map) or not callable(combine) or (finish is not None and not callable(finish)):
            raise TypeError("an Aggregator takes callables: map(key, value) -> piece, combine(piece, piece) -> "
                            "piece, and optionally finish(piece) -> result")
        self.map, self.combine, self.finish, self.empty, self.name = map, combine, finish, empty, name

    def __repr__(self) -> str:
        return f"<Aggregator {self.name}>"

    def fold(self, pairs) -> Any:
        """The piece for ``(key, value)`` pairs, or ``_ABSENT`` for none."""
        piece = _ABSENT
        for key, value in pairs:
            one = self.map(key, value)
            piece = one if piece is _ABSENT else self.combine(piece, one)
        return piece

    def result(self, pieces) -> Any:
        """Combine per-partition pieces (``_ABSENT`` for a partition with nothing) into the result."""
        total = _ABSENT
        for piece in pieces:
            if piece is not _ABSENT:
                total = piece if total is _ABSENT else self.combine(total, piece)
        if total is _ABSENT:
            return self.empty() if callable(self.empty) else self.empty
        return self.finish(total) if self.finish is not None else total


class _Value:
    """An aggregator's ``map``: the value, or ``of(value)`` (a class, not a closure: it pickles by name)."""

    def __init__(self, of=None):
        if of is not None and not callable(of):
            raise TypeError(f"'of' is a callable taking the value (say lambda v: v['price']), not {of!r}")
        self.of = of

    def __call__(self, key, value):
        return value if self.of is None else self.of(value)


class _Pair(_Value):
    def __call__(self, key, value):
        return (super().__call__(key, value), 1)


class _Singleton(_Value):
    def __call__(self, key, value):
        return {super().__call__(key, value)}


def _one(key, value):
    return 1


def _add(a, b):
    return a + b


def _pair_add(a, b):
    return (a[0] + b[0], a[1] + b[1])


def _divide(total):
    return total[0] / total[1]


def count() -> Aggregator:
    """How many entries (0 for none)."""
    return Aggregator(_one, _add, empty=0, name="count")


def sum_of(of=None) -> Aggregator:
    """The sum of the values (or of ``of(value)``); 0 for none."""
    return Aggregator(_Value(of), _add, empty=0, name="sum")


def min_of(of=None) -> Aggregator:
    """The smallest value (or ``of(value)``); None for none."""
    return Aggregator(_Value(of), min, name="min")


def max_of(of=None) -> Aggregator:
    """The largest value (or ``of(value)``); None for none."""
    return Aggregator(_Value(of), max, name="max")


def mean_of(of=None) -> Aggregator:
    """The mean of the values (or of ``of(value)``); None for none."""
    return Aggregator(_Pair(of), _pair_add, _divide, name="mean")


def distinct(of=None) -> Aggregator:
    """The set of distinct values (or ``of(value)``); an empty set for none."""
    return Aggregator(_Singleton(of), set.union, empty=set, name="distinct")


def as_aggregator(aggregator) -> Aggregator:
    """An Aggregator, or a ``(map, combine)`` pair made into one."""
    if isinstance(aggregator, Aggregator):
        return aggregator
    if isinstance(aggregator, tuple) and len(aggregator) == 2:
        return Aggregator(*aggregator)
    raise TypeError(f"aggregate takes an Aggregator (grid.aggregators.count(), sum_of(), min_of(), max_of(), "
                    f"mean_of(), distinct()) or a (map, combine) pair of callables, not {aggregator!r:.80}")


def check_predicate(predicate) -> None:
    if predicate is not None and not callable(predicate):
        raise TypeError(f"a predicate is a callable taking (key, value) and returning a bool, not {predicate!r:.80}")


# -- on the member ------------------------------------------------------------------------------------------


def call_id(base: str, key_data: bytes, attempt: int) -> str:
    """The call id of a processor's ``attempt``-th write to one key, the same when the task runs again."""
    return f"{base}:{hashlib.blake2b(key_data, digest_size=6).hexdigest()}:{attempt}"


def run_on_key(dmap, key, fn, args: tuple, base: str):
    """``fn(entry, *args)`` for ``key`` of ``dmap``, its change written only if the entry did not
    change meanwhile (else it runs again on the new value). Returns what ``fn`` returned."""
    key_data = dmap._key(key)
    for attempt in itertools.count():
        data = dmap._run(key_data, "get")
        entry = Entry(key, _ABSENT if data is None else pickle.loads(data))
        result = fn(entry, *args)
        if not entry._changed:
            return result
        calls = call_id(base, key_data, attempt)
        if not entry.exists:
            if data is None or dmap._run(key_data, "remove_if_same", data, call_id=calls):
                return result
        elif data is None:
            if dmap._run(key_data, "put_if_absent", dmap._dumps(entry.value), call_id=calls) is None:
                return result
        elif dmap._run(key_data, "replace_if_same", data, dmap._dumps(entry.value), call_id=calls):
            return result


def scan(dmap, partition: int, job: tuple):
    """One partition's part of a query job ``(kind, predicate, ...)``: ``("select", predicate)`` ->
    {key: value}, ``("aggregate", predicate, aggregator)`` -> a piece, ``("process", predicate, fn,
    args, base)`` -> {key: fn's result}."""
    kind, predicate = job[0], job[1]
    entries = dmap._at(partition, "entries", (), False)

    def matching():
        for key_data, data in entries:
            key, value = pickle.loads(key_data), pickle.loads(data)
            if predicate is None or predicate(key, value):
                yield key, value

    if kind == "select":
        return dict(matching())
    if kind == "aggregate":
        return job[2].fold(matching())
    fn, args, base = job[2:5]
    return {key: run_on_key(dmap, key, fn, args, base) for key, _ in list(matching())}


class LocalRunner:
    """Runs processors and queries in this process (a map on a ``LocalBackend``: tests, one process)."""

    def on_key(self, dmap, key, fn, args: tuple, base: str):
        return run_on_key(dmap, key, fn, args, base)

    def on_partitions(self, dmap, job: tuple) -> dict:
        return {partition: scan(dmap, partition, job) for partition in range(dmap._backend.partitions)}


__all__ = ["ABSENT", "Aggregator", "Entry", "LocalRunner", "as_aggregator", "count", "distinct", "max_of", "mean_of", "min_of",
           "run_on_key", "scan", "sum_of"]
