"""Counter: a cluster-wide integer, kept in the partition of its name, each change applied once.

::

    counter.add_and_get(5) --> Op(COUNTER, name, "add_and_get", (5,), call id) --> backend.execute(p, op)

Every change carries a call id, so a retry after a failover applies once (``store.Replica``
remembers it on the backups too): the value equals the acknowledged changes.
"""

from __future__ import annotations

from ..cluster.partitions import partition_of
from .store import COUNTER, CallIds, Op
from .sync import fence_of


class Counter:
    """A distributed counter named ``name``; make one with ``cluster.get_counter(name)``."""

    def __init__(self, name: str, backend):
        if not isinstance(name, str) or not name:
            raise TypeError(f"a counter's name is a non-empty str, not {name!r}")
        self.name = name
        self._backend = backend
        self._partition = partition_of(name, backend.partitions)
        self._calls = CallIds()

    def __repr__(self) -> str:
        return f"<Counter {self.name!r}>"

    def _run(self, action: str, *args, write: bool = True, fence=None):
        for value in args:
            if type(value) is not int:  # bool is an int, and no count
                raise TypeError(f"a counter takes ints, not {type(value).__name__} ({value!r})")
        call_id = self._calls.next() if write else None
        return self._backend.execute(self._partition, Op(COUNTER, self.name, action, args, call_id,
                                                         fence=fence_of(fence)))

    # ``fence``: a lock's FencingToken (``cluster.get_lock``); the change is refused with StaleToken
    # if the counter was changed with a newer token of that lock (its holder lost the lock since).

    def get(self) -> int:
        return self._run("get", write=False)

    def set(self, value: int, fence=None) -> None:
        self._run("set", value, fence=fence)

    def add_and_get(self, delta: int, fence=None) -> int:
        return self._run("add_and_get", delta, fence=fence)

    def get_and_add(self, delta: int, fence=None) -> int:
        return self._run("get_and_add", delta, fence=fence)

    def increment_and_get(self, fence=None) -> int:
        return self._run("add_and_get", 1, fence=fence)

    def decrement_and_get(self, fence=None) -> int:
        return self._run("add_and_get", -1, fence=fence)

    def destroy(self) -> None:
        """Remove the counter cluster-wide (a later use starts it again at 0)."""
        self._run("destroy")
        if self.on_destroy is not None:
            self.on_destroy()

    on_destroy = None  # set by the cluster handle: the catalog forgets the name

    def compare_and_set(self, expected: int, new: int, fence=None) -> bool:
        """Set it to ``new`` only if it is ``expected``; True if it was set."""
        return self._run("compare_and_set", expected, new, fence=fence)
