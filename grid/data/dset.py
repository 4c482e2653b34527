"""DSet: a ``collections.abc.MutableSet`` kept wholly in the partition of its name, set-like wherever
a set stored elsewhere can be.

::

    dset.add(x) --key_bytes(x)--> Op(SET, name, "add", (data,), call id) --> backend.execute(p, op)
    x in dset, len, discard, remove, pop, clear: at the owner, by the member's serialized form
    |= -= &= ^= and update/difference_update/...: one write each
    | & - ^, <= < >= > ==, isdisjoint: one read of the members, then a plain set's own operation

Members travel in their canonical form (``partitions.key_bytes``), as a map's keys: they must be
hashable, and compare by that form, so ``1`` and ``1.0`` are two members (as in Hazelcast), unlike
in a set. The operators return plain sets. Every write carries a call id, so a retry after a
failover applies once. The errors are set's own: KeyError for ``remove`` of a missing member and
``pop`` of an empty set, TypeError for an unhashable member.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, MutableSet, Set

from ..cluster.partitions import key_bytes
from .single import InItsPartition
from .store import SET


class DSet(InItsPartition, MutableSet):
    """A distributed set named ``name``; make one with ``cluster.get_set(name)``."""

    KIND = SET

    @staticmethod
    def _member(item) -> bytes:
        hash(item)  # set's rule: a mutable member raises TypeError ("unhashable type: 'list'")
        return key_bytes(item)

    def _members(self, items: Iterable) -> tuple:
        return tuple(self._member(item) for item in items)

    def _all(self) -> set:
        return {pickle.loads(data) for data in self._read("all")}

    # -- the set -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._read("len")

    def __contains__(self, item) -> bool:
        return self._read("contains", self._member(item))  # (TypeError for an unhashable item, as set's)

    def __iter__(self):
        return iter([pickle.loads(data) for data in self._read("all")])  # (the members as they were)

    def add(self, item) -> None:
        self._write("add", self._member(item))

    def discard(self, item) -> None:
        self._write("discard", self._member(item))

    def remove(self, item) -> None:
        if not self._write("discard", self._member(item)):
            raise KeyError(item)

    def pop(self):
        return pickle.loads(self._write("pop"))

    def clear(self) -> None:
        self._write("clear")

    def copy(self) -> set:
        """The members now, as a plain set."""
        return self._all()

    # -- several at once: one write each -------------------------------------------------------------------

    def update(self, *others: Iterable) -> None:
        for other in others:
            self._write("add_all", self._members(other))

    def difference_update(self, *others: Iterable) -> None:
        for other in others:
            self._write("discard_all", self._members(other))

    def intersection_update(self, *others: Iterable) -> None:
        for other in others:
            self._write("retain", self._members(other))

    def symmetric_difference_update(self, other: Iterable) -> None:
        other = set(other)
        here = self._all()
        self._write("discard_all", self._members(other & here))
        self._write("add_all", self._members(other - here))

    def __ior__(self, other: Set):
        self.update(other)
        return self

    def __isub__(self, other: Set):
        self.difference_update(other)
        return self

    def __iand__(self, other: Set):
        self.intersection_update(other)
        return self

    def __ixor__(self, other: Set):
        self.symmetric_difference_update(other)
        return self

    # -- against other sets: one read, then a plain set's operation --------------------------------------

    @classmethod
    def _from_iterable(cls, items) -> set:
        return set(items)

    @staticmethod
    def _plain(other):
        return other._all() if isinstance(other, DSet) else other

    def __or__(self, other):
        return self._all() | set(self._plain(other)) if isinstance(other, Iterable) else NotImplemented

    def __and__(self, other):
        return self._all() & set(self._plain(other)) if isinstance(other, Iterable) else NotImplemented

    def __sub__(self, other):
        return self._all() - set(self._plain(other)) if isinstance(other, Iterable) else NotImplemented

    def __xor__(self, other):
        return self._all() ^ set(self._plain(other)) if isinstance(other, Iterable) else NotImplemented

    def __ror__(self, other):
        return set(other) | self._all() if isinstance(other, Iterable) else NotImplemented

    def __rand__(self, other):
        return set(other) & self._all() if isinstance(other, Iterable) else NotImplemented

    def __rsub__(self, other):
        return set(other) - self._all() if isinstance(other, Iterable) else NotImplemented

    def __rxor__(self, other):
        return set(other) ^ self._all() if isinstance(other, Iterable) else NotImplemented

    def union(self, *others) -> set:
        return self._all().union(*map(self._plain, others))

    def intersection(self, *others) -> set:
        return self._all().intersection(*map(self._plain, others))

    def difference(self, *others) -> set:
        return self._all().difference(*map(self._plain, others))

    def symmetric_difference(self, other) -> set:
        return self._all().symmetric_difference(self._plain(other))

    def isdisjoint(self, other) -> bool:
        return self._all().isdisjoint(self._plain(other))

    def issubset(self, other) -> bool:
        return self._all().issubset(self._plain(other))

    def issuperset(self, other) -> bool:
        return self._all().issuperset(self._plain(other))

    def _compare(self, other, how):
        if not isinstance(other, Set):
            return NotImplemented
        return how(self._all(), set(self._plain(other)))

    def __eq__(self, other):
        return self._compare(other, set.__eq__)

    def __ne__(self, other):
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __le__(self, other):
        return self._compare(other, set.__le__)

    def __lt__(self, other):
        return self._compare(other, set.__lt__)

    def __ge__(self, other):
        return self._compare(other, set.__ge__)

    def __gt__(self, other):
        return self._compare(other, set.__gt__)

    __hash__ = None  # mutable, as a set
