"""DMap: a ``collections.abc.MutableMapping`` whose entries live in partitions, dict-like wherever a
mapping stored elsewhere can be.

::

    DMap[key] = value --key_bytes(key), dumps(value)--> Op(MAP, name, "set", ...) --> backend.execute(p, op)
    backend: anything with ``partitions``, ``execute(partition, op)`` and ``execute_many([(partition,
             op)])`` (sent together: one message per owner); ``store.LocalBackend`` runs
             the replicas in this process (tests, one-process use); the cluster's routes to owners

Keys travel in their canonical form (``partitions.key_bytes``): they must be hashable, as a
dict's are, and compare by that form, so ``1`` and ``1.0`` are two keys (as in Hazelcast), unlike
in a dict. Values are pickled here and unpickled here; members keep the bytes. Every write carries
a call id, so a retry after a failover applies once. What dict raises, a DMap raises: KeyError for a
missing key (``del``, ``pop``, ``popitem`` on an empty map), TypeError for an unhashable key.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import ItemsView, Iterable, Mapping, MutableMapping, ValuesView

from ..cluster.partitions import key_bytes, partition_of_bytes
from ..net import serialize
from . import processing
from .events import local_hub
from .store import MAP, MAP_WRITES, CallIds, Op, limits
from .sync import fence_of

_MISSING = object()
NEAR_CACHE_SIZE = 10_000  # entries a near cache keeps by default (the oldest kept go first)


def is_map_write(action: str) -> bool:
    return action in MAP_WRITES


_SETS = frozenset({"put", "set", "put_if_absent", "replace", "replace_if_same", "put_all"})  # writes that set values
RESERVED_PREFIX = "__grid."  # names of grid's own maps (the catalog of structures)


class DMap(MutableMapping):
    """A distributed map named ``name``; make one with ``cluster.get_map(name)``."""

    def __init__(self, name: str, backend, *, ttl=None, max_idle=None, max_size=None, near_cache=False,
                 internal: bool = False, runner=None, events=None):
        if not isinstance(name, str) or not name:
            raise TypeError(f"a map's name is a non-empty str, not {name!r}")
        if name.startswith(RESERVED_PREFIX) and not internal:
            raise ValueError(f"map names starting with {RESERVED_PREFIX!r} are grid's own; name it otherwise")
        self.name = name
        self._backend = backend
        self._calls = CallIds()
        self._runner = runner if runner is not None else processing.LocalRunner()  # where processors run
        checked = limits(ttl, max_idle, max_size)
        self._limits = checked if any(value is not None for value in checked) else ()
        self._events = events if events is not None else (lambda: local_hub(backend))  # -> the EventHub
        self._near: NearCache | None = None
        if near_cache:
            if isinstance(near_cache, bool) or not isinstance(near_cache, int) or near_cache < 1:
                if near_cache is not True:
                    raise ValueError(f"near_cache is True, or the entries it keeps (an int of 1 or more), not {near_cache!r}")
            self._near = NearCache(NEAR_CACHE_SIZE if near_cache is True else near_cache)
            hub = self._events()
            hub.on_gap(self._near.clear)
            hub.add(name, self._near.on_event, None, None, False)

    def __repr__(self) -> str:
        return f"<DMap {self.name!r}>"

    # -- plumbing ------------------------------------------------------------------------------------

    def _key(self, key) -> bytes:
        hash(key)  # dict's rule: a mutable key raises TypeError ("unhashable type: 'list'")
        return key_bytes(key)

    def _run(self, key_data: bytes, action: str, *args, write: bool = False, call_id: str | None = None,
             ttl=None, fence=None):
        return self._at(partition_of_bytes(key_data, self._backend.partitions), action, (key_data, *args), write,
                        call_id, ttl, fence)

    def _at(self, partition: int, action: str, args: tuple, write: bool, call_id: str | None = None, ttl=None,
            fence=None):
        near = self._near
        if near is not None and action == "get":
            data = near.get(args[0])
            if data is not None:
                return data
            seen = near.generation
            data = self._backend.execute(partition, Op(MAP, self.name, action, args))
            near.keep(args[0], data, seen)
            return data
        if call_id is None and is_map_write(action):
            call_id = self._calls.next()
        try:
            return self._backend.execute(partition, Op(MAP, self.name, action, args, call_id, 0,
                                                       self._limits_for(action, ttl), fence_of(fence)))
        finally:
            if near is not None and is_map_write(action):
                near.forget_written(action, args)

    def _limits_for(self, action: str, ttl) -> tuple:
        if action not in _SETS:
            return ()
        if ttl is None:
            return self._limits
        return limits(ttl, *(self._limits or (None, None, None))[1:])

    def _many(self, requests, write: bool) -> list:
        """``[(partition, action, args)]``' results, in order: sent together (one message per owner)."""
        try:
            return self._backend.execute_many([(partition, Op(MAP, self.name, action, args,
                                                               self._calls.next() if write else None, 0,
                                                               self._limits_for(action, None)))
                                               for partition, action, args in requests])
        finally:
            if self._near is not None and write:
                for _, action, args in requests:
                    self._near.forget_written(action, args)

    def _everywhere(self, action: str, write: bool = False) -> list:
        return self._many([(partition, action, ()) for partition in range(self._backend.partitions)], write)

    @staticmethod
    def _value(data):
        return None if data is None else pickle.loads(data)

    @staticmethod
    def _dumps(value) -> bytes:
        return serialize.dumps(value)

    # -- the Mapping protocol ----------------------------------------------------------------------

    def __getitem__(self, key):
        data = self._run(self._key(key), "get")
        if data is None:
            raise KeyError(key)
        return pickle.loads(data)

    def __setitem__(self, key, value) -> None:
        self._run(self._key(key), "set", self._dumps(value), write=True)

    def __delitem__(self, key) -> None:
        if not self._run(self._key(key), "delete", write=True):
            raise KeyError(key)

    def __contains__(self, key) -> bool:
        return self._run(self._key(key), "contains")

    def __len__(self) -> int:
        return sum(self._everywhere("size"))

    def __iter__(self):
        for keys in self._everywhere("keys"):
            for data in keys:
                yield pickle.loads(data)

    def __eq__(self, other) -> bool:
        if isinstance(other, DMap) and other.name == self.name and other._backend is self._backend:
            return True
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(self.items()) == dict(other.items())

    __hash__ = None  # as dict's: mutable, so unhashable

    def items(self):
        """A view of the entries, as dict's (iterating it reads each partition once)."""
        return _ItemsView(self)

    def values(self):
        """A view of the values, as dict's (iterating it reads each partition once)."""
        return _ValuesView(self)

    def _entries(self):
        for entries in self._everywhere("entries"):
            for key, value in entries:
                yield pickle.loads(key), pickle.loads(value)

    def get(self, key, default=None):
        data = self._run(self._key(key), "get")
        return default if data is None else pickle.loads(data)

    def pop(self, key, default=_MISSING):
        data = self._run(self._key(key), "remove", write=True)
        if data is None:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return pickle.loads(data)

    def popitem(self):
        """Remove and return some ``(key, value)``; KeyError when the map is empty (as dict's)."""
        for partition in range(self._backend.partitions):
            for data in self._at(partition, "keys", (), False):
                value = self._at(partition, "remove", (data,), True)
                if value is not None:  # another client may have taken it meanwhile: try the next
                    return pickle.loads(data), pickle.loads(value)
        raise KeyError("popitem(): dictionary is empty")

    def setdefault(self, key, default=None):
        """``self[key]`` if present, else sets it to ``default`` and returns that, atomically."""
        old = self._run(self._key(key), "put_if_absent", self._dumps(default), write=True)
        return default if old is None else pickle.loads(old)

    def clear(self) -> None:
        self._everywhere("clear", write=True)

    # -- beyond dict -----------------------------------------------------------------------------------

    # ``fence``: a lock's FencingToken (``cluster.get_lock``); the write is refused with StaleToken if
    # its partition was written with a newer token of that lock (its holder lost the lock since).

    def put(self, key, value, ttl=None, fence=None):
        """Set ``key`` to ``value``; returns the old value (None if there was none). ``ttl``: seconds
        this entry lives (instead of the map's ttl)."""
        return self._value(self._run(self._key(key), "put", self._dumps(value), write=True, ttl=ttl, fence=fence))

    def set(self, key, value, ttl=None, fence=None) -> None:
        """Set ``key`` to ``value``, returning nothing (cheaper than ``put``: the old value stays there)."""
        self._run(self._key(key), "set", self._dumps(value), write=True, ttl=ttl, fence=fence)

    def put_if_absent(self, key, value, ttl=None, fence=None):
        """Set ``key`` only if absent; returns the value already there, or None if it was set."""
        return self._value(self._run(self._key(key), "put_if_absent", self._dumps(value), write=True, ttl=ttl,
                                     fence=fence))

    def replace(self, key, value, fence=None):
        """Set ``key`` only if present; returns the old value, or None (nothing set)."""
        return self._value(self._run(self._key(key), "replace", self._dumps(value), write=True, fence=fence))

    def replace_if_same(self, key, old, new, fence=None) -> bool:
        """Set ``key`` to ``new`` only if its value is ``old`` (compared pickled); True if it was set."""
        return self._run(self._key(key), "replace_if_same", self._dumps(old), self._dumps(new), write=True,
                         fence=fence)

    def remove_if_same(self, key, value, fence=None) -> bool:
        """Remove ``key`` only if its value is ``value`` (compared pickled); True if it was removed."""
        return self._run(self._key(key), "remove_if_same", self._dumps(value), write=True, fence=fence)

    def delete(self, key, fence=None) -> bool:
        """Remove ``key``; True if it was there (``del``, without the KeyError)."""
        return self._run(self._key(key), "delete", write=True, fence=fence)

    def put_all(self, mapping: Mapping | Iterable) -> None:
        """Set many entries: one operation per partition they fall in."""
        pairs = mapping.items() if isinstance(mapping, Mapping) else mapping
        by_partition: dict[int, list] = {}
        for key, value in pairs:
            data = self._key(key)
            by_partition.setdefault(partition_of_bytes(data, self._backend.partitions), []).append(
                (data, self._dumps(value)))
        self._many([(partition, "put_all", (entries,)) for partition, entries in by_partition.items()], True)

    def get_all(self, keys: Iterable) -> dict:
        """The entries for ``keys`` that exist, as a dict: one operation per partition they fall in."""
        by_partition: dict[int, list] = {}
        originals = {}
        for key in keys:
            data = self._key(key)
            originals[data] = key
            by_partition.setdefault(partition_of_bytes(data, self._backend.partitions), []).append(data)
        found = {}
        for entries in self._many([(partition, "get_all", (datas,)) for partition, datas in by_partition.items()],
                                  False):
            for data, value in entries.items():
                found[originals[data]] = pickle.loads(value)
        return found

    on_destroy = None  # set by the cluster handle: the catalog forgets the name

    def destroy(self) -> None:
        """Remove the map and its entries cluster-wide (a later write starts it again, empty)."""
        self.clear()
        if self.on_destroy is not None:
            self.on_destroy()

    # -- listeners and the near cache ------------------------------------------------------------------

    def add_entry_listener(self, fn, key=None, predicate=None, include_value: bool = True) -> str:
        """Call ``fn(event)`` for each change of an entry (of ``key`` only, or those for which
        ``predicate(key, value)`` is true); returns the listener's id. ``event`` is a
        ``grid.EntryEvent``: ``kind`` ("added", "updated", "removed", "expired", "evicted",
        "cleared"), ``key``, ``value`` (added and updated, with ``include_value``), ``map_name``.
        Events of one key come in the order of its writes, on one thread ("grid-events"); the
        listener is registered on every data member before this returns."""
        if not callable(fn):
            raise TypeError(f"add_entry_listener takes a function fn(event), not {fn!r:.80}")
        processing.check_predicate(predicate)
        return self._events().add(self.name, fn, None if key is None else self._key(key), predicate,
                                  bool(include_value))

    def remove_entry_listener(self, listener_id: str) -> bool:
        """Stop the listener ``listener_id``; False if there was none."""
        return self._events().remove(listener_id)

    def stats(self, timeout: float = 5.0) -> dict:
        """``{"members": {uuid: {"entries", "backup_entries", "bytes", "operations", "hits"}}}``: what
        each data member owns and backs up of this map, the bytes of the entries it owns (keys and
        values, pickled), and the operations and hits (gets that found their entry) it answered;
        and with a near cache, this handle's ``"near_cache": {"entries", "hits", "misses"}``.
        A member that did not answer within ``timeout`` seconds has its error instead."""
        found: dict = {}
        map_stats = getattr(self._backend, "map_stats", None)
        if map_stats is not None:
            found["members"] = map_stats(self.name, timeout)
        if self._near is not None:
            found["near_cache"] = self._near.stats()
        return found

    # -- code at the data ------------------------------------------------------------------------------

    def execute_on_key(self, key, fn, /, *args):
        """Run ``fn(entry, *args)`` on the member that owns ``key``, atomically for that key, and
        return its result. ``entry.key``, ``entry.value`` (None if absent), ``entry.exists``; set
        ``entry.value`` to store a value, ``del entry.value`` to remove the entry: the change is
        written (and backed up) only if no other write to the key came meanwhile, else ``fn`` runs
        again on the new value. So ``fn`` may run more than once: keep it a function of the entry.
        """
        self._key(key)  # a bad key fails here, not on a member
        self._check_callable(fn, "execute_on_key")
        return self._runner.on_key(self, key, fn, args, self._calls.next())

    def execute_on_entries(self, fn, /, *args, predicate=None) -> dict:
        """``execute_on_key`` for every entry (``predicate(key, value)`` true), in parallel on the
        owners; returns ``{key: fn's result}``."""
        self._check_callable(fn, "execute_on_entries")
        processing.check_predicate(predicate)
        return self._combined(self._runner.on_partitions(self, ("process", predicate, fn, args, self._calls.next())))

    def select(self, predicate) -> dict:
        """``{key: value}`` of the entries for which ``predicate(key, value)`` is true, filtered on
        the members in parallel (only the matches travel)."""
        processing.check_predicate(predicate)
        if predicate is None:
            raise TypeError("select takes a predicate(key, value); for every entry use dict(map)")
        return self._combined(self._runner.on_partitions(self, ("select", predicate)))

    def aggregate(self, aggregator, predicate=None):
        """Fold the entries (``predicate(key, value)`` true, or all) with ``aggregator``: one of
        ``grid.aggregators`` (count, sum_of, min_of, max_of, mean_of, distinct) or a ``(map,
        combine)`` pair, run on the members in parallel (one piece per partition travels)."""
        aggregator = processing.as_aggregator(aggregator)
        processing.check_predicate(predicate)
        pieces = self._runner.on_partitions(self, ("aggregate", predicate, aggregator))
        return aggregator.result(pieces[partition] for partition in sorted(pieces))

    @staticmethod
    def _check_callable(fn, what: str) -> None:
        if not callable(fn):
            raise TypeError(f"{what} takes a function fn(entry, *args), not {fn!r:.80}")

    @staticmethod
    def _combined(by_partition: dict) -> dict:
        combined: dict = {}
        for part in by_partition.values():
            combined.update(part)
        return combined


class NearCache:
    """A map's entries as this client last read them (values pickled), dropped when their owner
    says they changed, when this client writes them, and all at once when events may have been
    missed. A read kept only if nothing was dropped while it was on its way (``generation``)."""

    def __init__(self, size: int):
        self.size = size
        self._entries: dict[bytes, bytes] = {}
        self._lock = threading.Lock()
        self.generation = 0
        self.hits = self.misses = 0

    def get(self, key: bytes):
        data = self._entries.get(key)
        if data is None:
            self.misses += 1
        else:
            self.hits += 1
        return data

    def keep(self, key: bytes, data, seen: int) -> None:
        if data is None:
            return
        with self._lock:
            if self.generation != seen:
                return
            if len(self._entries) >= self.size and key not in self._entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = data

    def forget(self, key: bytes | None) -> None:
        with self._lock:
            self.generation += 1
            if key is None:
                self._entries.clear()
            else:
                self._entries.pop(key, None)

    def clear(self) -> None:
        self.forget(None)

    def forget_written(self, action: str, args: tuple) -> None:
        if action == "clear" or not args:
            self.forget(None)
        elif action == "put_all":
            for key, _ in args[0]:
                self.forget(key)
        else:
            self.forget(args[0])

    def on_event(self, event) -> None:
        self.forget(None if event.key is None else key_bytes(event.key))

    def stats(self) -> dict:
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses}


class _ItemsView(ItemsView):
    def __iter__(self):
        return self._mapping._entries()


class _ValuesView(ValuesView):
    def __iter__(self):
        return (value for _, value in self._mapping._entries())
