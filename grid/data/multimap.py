"""MultiMap: keys with a list of values each, partitioned by key as a DMap is (Hazelcast's MultiMap).

::

    mm.put(k, v) --key_bytes(k), dumps(v)--> Op(MULTIMAP, name, "put", (key, value), call id)
                 --> backend.execute(partition of k, op)
    mm.get(k) -> [values] in the order they were put;  mm.remove(k) -> every value of k, removed
    len(mm), keys(), values(), items(), clear(): every partition at once (one message per owner)

Keys compare by their serialized form, as a DMap's; a value given to ``remove(k, v)`` or
``contains_entry(k, v)`` matches a stored one by its pickle. Every write carries a call id, so a
retry after a failover applies once.
"""

from __future__ import annotations

import pickle

from ..cluster.partitions import key_bytes, partition_of_bytes
from ..net import serialize
from .lists import MULTIMAP
from .store import CallIds, Op


class MultiMap:
    """A distributed multimap named ``name``; make one with ``cluster.get_multimap(name)``."""

    def __init__(self, name: str, backend):
        if not isinstance(name, str) or not name:
            raise TypeError(f"a multimap's name is a non-empty str, not {name!r}")
        self.name = name
        self._backend = backend
        self._calls = CallIds()

    def __repr__(self) -> str:
        return f"<MultiMap {self.name!r}>"

    on_destroy = None  # set by the cluster handle: the catalog forgets the name

    def destroy(self) -> None:
        """Remove the multimap and its values cluster-wide (a later put starts it again, empty)."""
        self.clear()
        if self.on_destroy is not None:
            self.on_destroy()

    # -- plumbing ------------------------------------------------------------------------------------

    def _at(self, key, action: str, *args, write: bool = False):
        hash(key)  # dict's rule: a mutable key raises TypeError ("unhashable type: 'list'")
        data = key_bytes(key)
        return self._backend.execute(partition_of_bytes(data, self._backend.partitions),
                                     Op(MULTIMAP, self.name, action, (data, *args),
                                        self._calls.next() if write else None))

    def _everywhere(self, action: str, write: bool = False) -> list:
        return self._backend.execute_many([(partition, Op(MULTIMAP, self.name, action, (),
                                                          self._calls.next() if write else None))
                                           for partition in range(self._backend.partitions)])

    # -- the multimap ----------------------------------------------------------------------------------

    def put(self, key, value) -> None:
        """Add ``value`` to ``key``'s values (a value may be there more than once)."""
        self._at(key, "put", serialize.dumps(value), write=True)

    def get(self, key) -> list:
        """``key``'s values, in the order they were put ([] for a key that has none)."""
        return [pickle.loads(data) for data in self._at(key, "get")]

    def __getitem__(self, key) -> list:
        return self.get(key)

    def remove(self, key, value=None):
        """Without ``value``: remove every value of ``key`` and return them (a list, [] if none).
        With it: remove one value equal to it (by its pickle); True if there was one."""
        if value is None:
            return [pickle.loads(data) for data in self._at(key, "remove", None, write=True)]
        return self._at(key, "remove", serialize.dumps(value), write=True)

    def value_count(self, key) -> int:
        """How many values ``key`` has."""
        return self._at(key, "count")

    def __contains__(self, key) -> bool:
        return self._at(key, "count") > 0

    def contains_entry(self, key, value) -> bool:
        return self._at(key, "contains_entry", serialize.dumps(value))

    def __len__(self) -> int:
        """How many values, over all keys (as Hazelcast's MultiMap.size)."""
        return sum(self._everywhere("size"))

    def keys(self) -> list:
        return [pickle.loads(data) for keys in self._everywhere("keys") for data in keys]

    def __iter__(self):
        return iter(self.keys())

    def values(self) -> list:
        return [pickle.loads(data) for entries in self._everywhere("entries") for _, values in entries
                for data in values]

    def items(self) -> list:
        """``[(key, [values])]``, one per key."""
        return [(pickle.loads(key), [pickle.loads(data) for data in values])
                for entries in self._everywhere("entries") for key, values in entries]

    def clear(self) -> None:
        self._everywhere("clear", write=True)
