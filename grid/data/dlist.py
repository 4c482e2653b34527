"""DList: a ``collections.abc.MutableSequence`` kept wholly in the partition of its name, list-like
wherever a list stored elsewhere can be.

::

    dlist.append(x) --dumps(x)--> Op(LIST, name, "append", (data,), call id) --> backend.execute(p, op)
    dlist[i], dlist[i:j], pop, insert, del, reverse: by position, at the owner (``lists``)
    remove(x), index(x), count(x), x in dlist, sort(): need Python's ==, so they read the items here:
        remove and sort then write back only if the list is still at the version read, else again

Items are pickled here and unpickled here; members keep the bytes. Every write carries a call id, so
a retry after a failover applies once. The errors are list's own: IndexError for a position out of
range, ValueError for an item not there (``remove``, ``index``) or an extended slice of another size,
TypeError for an index that is not an int or a slice.
"""

from __future__ import annotations

import operator
import pickle
from collections.abc import Iterable, MutableSequence

from ..net import serialize
from .single import InItsPartition
from .store import LIST


class DList(InItsPartition, MutableSequence):
    """A distributed list named ``name``; make one with ``cluster.get_list(name)``."""

    KIND = LIST

    def _snapshot(self) -> tuple[list, object]:
        """``(items, version)``: every item unpickled, and the version they are of."""
        datas, version = self._read("all")
        return [pickle.loads(data) for data in datas], version

    @staticmethod
    def _dumps(item) -> bytes:
        return serialize.dumps(item)  # SerializationError (a TypeError) before anything is sent

    @staticmethod
    def _index(index) -> int:
        try:
            return operator.index(index)
        except TypeError:
            raise TypeError(f"list indices must be integers or slices, not {type(index).__name__}") from None

    @staticmethod
    def _slice(index: slice) -> tuple:
        return tuple(None if part is None else DList._index(part) for part in (index.start, index.stop, index.step))

    # -- the sequence ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._read("len")

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = self._slice(index)
            if step == 0:
                raise ValueError("slice step cannot be zero")
            return [pickle.loads(data) for data in self._read("slice", start, stop, step)]
        return pickle.loads(self._read("get", self._index(index)))

    def __setitem__(self, index, value) -> None:
        if isinstance(index, slice):
            start, stop, step = self._slice(index)
            if step == 0:
                raise ValueError("slice step cannot be zero")
            if not isinstance(value, Iterable):
                raise TypeError("must assign iterable to extended slice" if step not in (None, 1)
                                else "can only assign an iterable")
            self._write("set_slice", start, stop, step, tuple(self._dumps(item) for item in value))
            return
        self._write("set", self._index(index), self._dumps(value))

    def __delitem__(self, index) -> None:
        if isinstance(index, slice):
            start, stop, step = self._slice(index)
            if step == 0:
                raise ValueError("slice step cannot be zero")
            self._write("delete_slice", start, stop, step)
            return
        self._write("delete", self._index(index))

    def __iter__(self):
        return iter(self._snapshot()[0])  # (one read: the items as they were, as a list's copy iterates)

    def __reversed__(self):
        return reversed(self._snapshot()[0])

    def __contains__(self, item) -> bool:
        return item in self._snapshot()[0]

    def __eq__(self, other) -> bool:
        if isinstance(other, DList):
            other = other._snapshot()[0]
        if not isinstance(other, list):
            return NotImplemented
        return self._snapshot()[0] == other

    def __ne__(self, other) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # mutable, as a list

    def insert(self, index, value) -> None:
        self._write("insert", self._index(index), self._dumps(value))

    def append(self, value) -> None:
        self._write("append", self._dumps(value))

    def extend(self, values: Iterable) -> None:
        """Append every item of ``values``, in one write (all or none)."""
        if values is self:
            values = self._snapshot()[0]
        self._write("extend", tuple(self._dumps(value) for value in values))

    def __iadd__(self, values: Iterable):
        self.extend(values)
        return self

    def pop(self, index=-1):
        return pickle.loads(self._write("pop", self._index(index)))

    def clear(self) -> None:
        self._write("clear")

    def reverse(self) -> None:
        self._write("reverse")

    def index(self, value, start=0, stop=None) -> int:
        items = self._snapshot()[0]
        try:
            return items.index(value, start, len(items) if stop is None else stop)
        except ValueError:
            raise ValueError(f"{value!r} is not in list") from None

    def count(self, value) -> int:
        return self._snapshot()[0].count(value)

    def remove(self, value) -> None:
        """Remove the first item equal to ``value`` (ValueError if none), even as others write."""
        while True:
            items, version = self._snapshot()
            try:
                at = items.index(value)
            except ValueError:
                raise ValueError("list.remove(x): x not in list") from None
            if self._write("delete_if_version", at, version):
                return

    def sort(self, *, key=None, reverse: bool = False) -> None:
        """Sort in place with Python's sort (stable, ``key``, ``reverse``), even as others write: the
        items are sorted here and written back if the list did not change meanwhile, else again."""
        while True:
            datas, version = self._read("all")
            pairs = [(pickle.loads(data), data) for data in datas]
            # (sorted by the items; each keeps its own bytes, so nothing is pickled again)
            order = sorted(range(len(pairs)), key=(lambda i: pairs[i][0]) if key is None else
                           (lambda i: key(pairs[i][0])), reverse=reverse)
            if self._write("replace_if_version", tuple(pairs[i][1] for i in order), version):
                return

    def copy(self) -> list:
        """The items now, as a plain list."""
        return self._snapshot()[0]
