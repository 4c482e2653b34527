"""What a structure kept wholly in the partition of its name does alike (DList, DSet): its ops to
that partition, each write with a call id, and an op the member refused raised as Python's error.
"""

from __future__ import annotations

from ..cluster.partitions import partition_of
from .store import CallIds, Op, Refused

_ERRORS = {"IndexError": IndexError, "ValueError": ValueError, "KeyError": KeyError, "RuntimeError": RuntimeError}


def raise_refused(exc: Refused, errors: dict | None = None):
    """Raise what the Python structure raises for the op a member refused (``lists.Refused``); ``errors``
    names more errors (a structure's own)."""
    error = (errors or {}).get(exc.error) or _ERRORS.get(exc.error, ValueError)
    raise error(str(exc)) from None


class InItsPartition:
    """A distributed structure of ``KIND`` named ``name``, in the partition of its name."""

    KIND = ""  # the store's kind (set by the subclass)
    ERRORS: dict = {}  # the subclass's own errors a member may name, by name

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
            raise_refused(exc, self.ERRORS)

    def _write(self, action: str, *args):
        try:
            return self._backend.execute(self._partition, Op(self.KIND, self.name, action, args, self._calls.next()))
        except Refused as exc:
            raise_refused(exc, self.ERRORS)
