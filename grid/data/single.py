"""What a structure kept wholly in the partition of its name does alike (DList, DSet): its ops to
that partition, each write with a call id, and an op the member refused raised as Python's error.
"""

from __future__ import annotations

from ..cluster.partitions import partition_of
from .store import CallIds, Op, Refused

_ERRORS = {"IndexError": IndexError, "ValueError": ValueError, "KeyError": KeyError}


def raise_refused(exc: Refused):
    """Raise what the Python structure raises for the op a member refused (``lists.Refused``)."""
    raise _ERRORS.get(exc.error, ValueError)(str(exc)) from None


class InItsPartition:
    """A distributed structure of ``KIND`` named ``name``, in the partition of its name."""

    KIND = ""  # the store's kind (set by the subclass)

    def __init__(self, name: str, backend):
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.KIND}'s name is a non-empty str, not {name!r}")
        self.name = name
        self._backend = backend
        self._partition = partition_of(name, backend.partitions)
        self._calls = CallIds()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    on_destroy = None  # set by the cluster handle: the catalog forgets the name

    def destroy(self) -> None:
        """Remove the structure and its items cluster-wide (a later write starts it again, empty)."""
        self._write("destroy")
        if self.on_destroy is not None:
            self.on_destroy()

    def _read(self, action: str, *args):
        try:
            return self._backend.execute(self._partition, Op(self.KIND, self.name, action, args))
        except Refused as exc:
            raise_refused(exc)

    def _write(self, action: str, *args):
        try:
            return self._backend.execute(self._partition, Op(self.KIND, self.name, action, args, self._calls.next()))
        except Refused as exc:
            raise_refused(exc)
