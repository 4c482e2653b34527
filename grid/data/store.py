"""One member's share of the distributed data, as a state machine without IO: its partition replicas.

::

    owner:   Replica.execute(op) --> Outcome(result, record)    record: what the backups apply
               reads give no record; a write's record holds its effects and its result
             the caller acknowledges the write once every backup applied the record
    backup:  Replica.replicate(record)   in sequence order; refused (Fenced) from an older table
    retry:   an op with a call id already applied answers with the stored result, applying nothing,
             on the owner and on a backup promoted since (the record carried the call id there)
    migrate: Replica.snapshot() --> Replica.restore(snapshot) on the new replica, then the records
             made meanwhile (replicate skips those the snapshot holds)

Keys and values are bytes: a map's keys in their canonical form (``partitions.key_bytes``) and
values pickled by the caller. Nothing here unpickles anything, so any thread may run it; the
layer above serializes calls per replica. A structure lives in the partitions its keys hash to
(a map), or wholly in the partition of its name (a queue, a counter).

``CallIds`` makes a client handle's call ids; ``LocalBackend`` runs every partition's replica in
one process (for tests and one-process use), one op at a time, and lets a blocking caller (a queue's
``get`` on an empty queue) wait until a partition's data changes.

Records replicate effects, not operations: ``("set", key, value)`` rather than "put_if_absent",
so a backup never decides anything and cannot diverge from its owner.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import threading
import time
import uuid as uuid_module
from typing import Any

from ..errors import GridError
from . import lists, locks, ring
from .lists import LIST, MULTIMAP, SET
from .locks import LOCK, SEMAPHORE
from .ring import TOPIC

MAP, QUEUE, COUNTER = "map", "queue", "counter"
KINDS = (MAP, QUEUE, COUNTER, LIST, SET, MULTIMAP, LOCK, SEMAPHORE, TOPIC)
_CALL_IDS = 4096  # call ids (and their results) a replica remembers, the newest


class StoreError(Exception):
    """An operation this replica refuses (the message says why)."""


class Fenced(StoreError):
    """A record or op from a partition table older than the one this replica follows: its sender is
    no longer the owner (a paused or partitioned ex-owner), so it must not be applied or acknowledged."""


class Refused(StoreError):
    """An op refused as the Python structure refuses it (a list's IndexError, say): ``error`` names
    the error the caller raises, with this message."""

    def __init__(self, message: str, error: str):
        super().__init__(message)
        self.error = error

    def __reduce__(self):
        return (Refused, (str(self), self.error))


class StaleToken(StoreError, GridError):
    """A write fenced with a lock's token older than one this partition was written with: its
    holder lost the lock (its lease ran out while it paused or was cut off) and another took it."""


class OutOfOrder(StoreError):
    """A record skipped some before it: the backup needs the ones between (or a snapshot)."""

    def __init__(self, message: str, expected: int):
        super().__init__(message)
        self.expected = expected


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation on a structure in a partition. ``args`` are bytes and ints."""

    kind: str
    name: str
    action: str
    args: tuple = ()
    call_id: str | None = None  # for writes: a retried call carries the same one
    table_version: int = 0
    limits: tuple = ()  # a map's writes: (ttl, max_idle, max_size), see limits(); () for none
    fence: tuple = ()  # a write fenced by a lock: (lock name, fencing token); () for none


def op_fields(op: Op, table_version: int) -> tuple:
    """``op`` as it travels, for ``table_version``: a plain tuple, which pickles in a fifth of the
    time a dataclass does (on both ends, for every op)."""
    return (op.kind, op.name, op.action, op.args, op.call_id, table_version, op.limits, op.fence)


def op_from_fields(fields) -> Op | None:
    """The Op that ``op_fields`` made, or None if ``fields`` is not well formed (off the wire)."""
    if type(fields) is not tuple or len(fields) != 8:
        return None
    kind, name, action, args, call_id, table_version, op_limits, fence = fields
    if (type(kind) is not str or type(name) is not str or type(action) is not str or type(args) is not tuple
            or call_id is not None and type(call_id) is not str or type(table_version) is not int
            or type(op_limits) is not tuple or len(op_limits) not in (0, 3) or type(fence) is not tuple
            or fence and (len(fence) != 2 or type(fence[0]) is not str or type(fence[1]) is not int)):
        return None
    if op_limits:
        try:
            limits(*op_limits)
        except (TypeError, ValueError):
            return None
    return Op(kind, name, action, args, call_id, table_version, op_limits, fence)


@dataclasses.dataclass(frozen=True)
class Record:
    """A write as its owner applied it: what a backup applies, in ``seq`` order."""

    partition: int
    seq: int
    table_version: int
    call_id: str | None
    result: Any
    effects: tuple  # ((kind, name, effect, args), ...)


@dataclasses.dataclass(frozen=True)
class Outcome:
    result: Any
    record: Record | None  # None for a read, or a write that changed nothing and needs no backup


def limits(ttl=None, max_idle=None, max_size=None) -> tuple:
    """A map's ``(ttl, max_idle, max_size)``, checked: seconds an entry lives after its write,
    seconds it lives after its last read or write, and how many entries the map keeps (the
    least recently used go first); None for no limit. (A plain tuple: it travels in every write.)"""
    for what, value in (("ttl", ttl), ("max_idle", max_idle)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{what} is a number of seconds above 0, or None for none, not {value!r}")
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1):
        raise ValueError(f"max_size is an int of 1 or more, or None for none, not {max_size!r}")
    return (ttl, max_idle, max_size)


_NO_LIMITS = (None, None, None)
SWEEP_INTERVAL = 0.5  # seconds between an owner's looks for entries whose time is up

_READS = {
    MAP: {"get", "contains", "size", "keys", "entries", "get_all"},
    QUEUE: {"size", "peek", "unfinished"},
    COUNTER: {"get"},
    **lists.READS,
    **locks.READS,
    **ring.READS,
}
_WRITES = {
    MAP: {"put", "set", "put_if_absent", "replace", "replace_if_same", "remove", "remove_if_same", "delete",
          "put_all", "clear", "expire", "evict", "merge"},
    QUEUE: {"offer", "offer_all", "poll", "task_done", "clear", "destroy", "merge"},
    COUNTER: {"set", "add_and_get", "get_and_add", "compare_and_set", "destroy", "merge"},
    **lists.WRITES,
    **locks.WRITES,
    **ring.WRITES,
}


MAP_WRITES = frozenset(_WRITES[MAP])


def is_write(op: Op) -> bool:
    """Whether ``op`` changes a structure (an unknown action counts as one: the store refuses it)."""
    return op.action not in _READS.get(op.kind, ())


class SplitBrainProtection(StoreError, GridError):
    """A write on a side of the cluster with fewer members than ``split_brain_protection`` asks for."""


class CallIds:
    """Call ids for one client handle's writes: ``caller:n``, unique across processes, so a retried
    write (same id) applies once."""

    def __init__(self):
        self._caller = uuid_module.uuid4().hex[:12]
        self._numbers = itertools.count(1)

    def next(self) -> str:
        return f"{self._caller}:{next(self._numbers)}"


class LocalBackend:
    """Every partition's replica in this process, one op at a time: the structures' backend for tests
    and one-process use (any thread may use it); the cluster's backend routes ops to owners."""

    def __init__(self, partitions: int, clock=time.time):
        self.partitions = partitions
        self._clock = clock  # wall-clock seconds (entries' ttl and max_idle)
        self._replicas: dict[int, Replica] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when a write changes some partition's data
        self._changes: dict[int, int] = {}  # per partition: the writes that changed its data
        self._swept_at = 0.0
        self.listeners = None  # events.MemberListeners, once a map on this backend has a listener
        self.events = None  # the EventHub of the maps on this backend (events.local_hub)

    def execute(self, partition: int, op: Op):
        with self._lock:
            replica = self._replicas.get(partition)
            if replica is None:
                replica = self._replicas[partition] = Replica(partition, self._clock)
            outcome = self._written(replica.execute(op))
            if op.limits and op.limits[2] and outcome.record is not None:
                for partition_, key in over_capacity(self._replicas.values(), op.name, op.limits[2], self.partitions,
                                                     owned=self.partitions):
                    self._written(self._replicas[partition_].execute(Op(MAP, op.name, "evict", ((key,),))))
            now = self._clock()
            if now - self._swept_at >= SWEEP_INTERVAL:
                self._swept_at = now
                for swept in self._replicas.values():
                    for name, keys in swept.due().items():
                        self._written(swept.execute(Op(MAP, name, "expire", (keys,))))
            # Not every record: a write with a call id makes one even when it changed nothing (an empty
            # poll), and counting those would wake a blocked poller with its own failed try.
            if outcome.record is not None and outcome.record.effects:
                self._changes[partition] = self._changes.get(partition, 0) + 1
                self._changed.notify_all()
            return outcome.result

    def close(self) -> None:
        """Stop the listeners' thread, if a map on this backend had listeners."""
        if self.events is not None:
            self.events.close()

    def _written(self, outcome: Outcome) -> Outcome:
        if outcome.record is not None and outcome.record.effects and self.listeners is not None:
            self.listeners.written(outcome.record.effects)
        return outcome

    def execute_many(self, items) -> list:
        """Each ``(partition, op)``'s result, in order."""
        return [self.execute(partition, op) for partition, op in items]

    def wait_for_change(self, partition: int, seen: int | None = None, timeout: float | None = None) -> int:
        """Wait until ``partition``'s data changes, for a caller that will try its op again then.

        The number returned counts the writes that changed the partition's data. Take it (``seen``
        None: no wait) before the first try, so that a change between the try and the wait is not
        missed: the wait returns at once when the number is no longer ``seen``. A cluster backend will
        not wait here: it will park the blocked request on the partition's owner instead.

        Args:
            seen: the number the caller saw last; None returns the number now, without waiting.
            timeout: seconds to wait at most; None waits for as long as it takes.

        Returns:
            The number now: ``seen`` itself when the timeout passed with no change.
        """
        with self._changed:
            if seen is not None:
                self._changed.wait_for(lambda: self._changes.get(partition, 0) != seen, timeout)
            return self._changes.get(partition, 0)


class Replica:
    """One partition's data on this member: its structures, how far its records go, recent call ids.

    A map entry written with a ttl or max_idle has its times in ``_meta`` (replicated: the write's
    wall-clock time, so a promoted backup expires it when the owner would have); its last use is
    in ``_touched``, kept by the owner only (a new owner starts every idle clock when it takes the
    partition: an entry may live longer after a failover, never shorter). An entry whose time is
    up reads as absent at once, and the owner's sweep removes it (an "expire" write, backed up).
    """

    def __init__(self, partition: int, clock=time.time):
        self.partition = partition
        self.seq = 0  # records applied (as owner, or replicated)
        self.table_version = 0  # the newest table this replica knows of: older senders are fenced
        self._structures: dict[tuple[str, str], Any] = {}
        self._calls: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._clock = clock
        self._meta: dict[str, dict] = {}  # map name -> {key: (expires at or None, max_idle or None, written at)}
        self._touched: dict[str, collections.OrderedDict] = {}  # map name -> {key: last use}, oldest first
        self._idle_since = clock()  # idle clocks start no earlier than this replica
        self.keep_times = False  # the owner notes each entry's write time (merge_policy = latest_update)
        self._written: dict[str, dict] = {}  # map name -> {key: wall-clock time of its write}, kept_times only
        self._fences: dict[str, int] = {}  # lock name -> the newest fencing token a write here was fenced with

    # -- the table ---------------------------------------------------------------------------------

    def follow(self, table_version: int) -> None:
        """A newer partition table arrived: from now on, ops and records of older ones are fenced."""
        self.table_version = max(self.table_version, table_version)

    def applied(self, call_id: str) -> bool:
        """Whether the write with ``call_id`` was applied here (its retry applies nothing)."""
        return call_id in self._calls

    # -- owner ---------------------------------------------------------------------------------------

    def execute(self, op: Op) -> Outcome:
        """Run ``op`` as the owner. A write's record must reach every backup before it is acknowledged.

        Raises:
            Fenced: ``op`` names an older partition table than this replica follows.
            StoreError: an unknown action or kind, or bad arguments.
        """
        if op.table_version < self.table_version:
            raise Fenced(f"partition {self.partition}: the op was routed by table version {op.table_version}, "
                         f"and this replica follows version {self.table_version}")
        if op.kind not in KINDS:
            raise StoreError(f"unknown structure kind {op.kind!r} (known: {', '.join(KINDS)})")
        if op.action in _READS[op.kind]:
            kind_module = _KIND_MODULES.get(op.kind)
            if kind_module is not None:
                try:
                    return Outcome(kind_module.read(op.kind, self._structures.get((op.kind, op.name)), op.action,
                                                    op.args, self._clock()), None)
                except kind_module.Refused as exc:
                    raise Refused(str(exc), exc.error) from None
            return Outcome(self._read(op), None)
        if op.action not in _WRITES[op.kind]:
            known = sorted(_READS[op.kind] | _WRITES[op.kind])
            raise StoreError(f"a {op.kind} has no operation {op.action!r} (it has: {', '.join(known)})")
        if op.call_id is not None and op.call_id in self._calls:
            return Outcome(self._calls[op.call_id], None)  # a retry: applied once already
        fence = ()
        if op.fence:
            lock, token = op.fence
            newest = self._fences.get(lock, 0)
            if token < newest:
                raise StaleToken(f"the write to {op.kind} {op.name!r} is fenced with token {token} of lock {lock!r}, "
                                 f"and this partition was written with its newer token {newest}: that holder lost "
                                 "the lock (its lease ran out) and another took it since")
            if token > newest:
                fence = ((op.kind, op.name, "fence", (lock, token)),)
        self._limits = op.limits or _NO_LIMITS
        kind_module = _KIND_MODULES.get(op.kind)
        if kind_module is not None:
            stamp = (max(op.table_version, self.table_version), self.seq + 1)  # (the record's, if it makes one)
            try:
                result, effects = kind_module.write(op.kind, op.name, self._structures.get((op.kind, op.name)),
                                                    op.action, op.args, stamp, self._clock())
            except kind_module.Refused as exc:
                raise Refused(str(exc), exc.error) from None
        else:
            result, effects = getattr(self, f"_{op.kind}_{op.action}")(op.name, *op.args)
        if not effects and op.call_id is None:
            return Outcome(result, None)
        self.seq += 1
        record = Record(self.partition, self.seq, max(op.table_version, self.table_version), op.call_id,
                        result, (*fence, *effects))
        self._apply(record)
        return Outcome(result, record)

    # -- backup --------------------------------------------------------------------------------------

    def replicate(self, record: Record) -> None:
        """Apply the owner's ``record``; one applied already (or in a restored snapshot) is skipped.

        Raises:
            Fenced: the record comes from an older table than this replica follows.
            OutOfOrder: records before it are missing (``exc.expected`` is the next one wanted).
        """
        if record.table_version < self.table_version:
            raise Fenced(f"partition {self.partition}: a record of table version {record.table_version}, and "
                         f"this replica follows version {self.table_version}: its sender no longer owns it")
        if record.seq <= self.seq:
            return
        if record.seq != self.seq + 1:
            raise OutOfOrder(f"partition {self.partition}: record {record.seq} after {self.seq}", self.seq + 1)
        self.seq = record.seq
        self._apply(record)

    def _apply(self, record: Record) -> None:
        for kind, name, effect, args in record.effects:
            _EFFECTS[effect](self, kind, name, *args)
        if record.call_id is not None:
            self._calls[record.call_id] = record.result
            while len(self._calls) > _CALL_IDS:
                self._calls.popitem(last=False)

    # -- migration -----------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Everything this replica holds, for a new replica (plain data: bytes, ints, lists, dicts)."""
        structures = []
        for (kind, name), value in self._structures.items():
            if kind == MAP:
                structures.append((kind, name, dict(value)))
            elif kind == QUEUE:
                structures.append((kind, name, {"items": list(value["items"]), "unfinished": value["unfinished"]}))
            elif kind in _KIND_MODULES:
                structures.append((kind, name, _KIND_MODULES[kind].copy(kind, value)))
            else:
                structures.append((kind, name, value))
        return {"partition": self.partition, "seq": self.seq, "table_version": self.table_version,
                "structures": structures, "calls": list(self._calls.items()),
                "meta": {name: dict(meta) for name, meta in self._meta.items() if meta},
                "fences": dict(self._fences),
                "written": {name: dict(times) for name, times in self._written.items() if times}}

    @classmethod
    def restore(cls, snapshot: dict) -> Replica:
        replica = cls(snapshot["partition"])
        replica.seq = snapshot["seq"]
        replica.table_version = snapshot["table_version"]
        for kind, name, value in snapshot["structures"]:
            if kind == MAP:
                replica._structures[kind, name] = dict(value)
            elif kind == QUEUE:
                replica._structures[kind, name] = {"items": collections.deque(value["items"]),
                                                   "unfinished": value["unfinished"]}
            elif kind in _KIND_MODULES:
                replica._structures[kind, name] = _KIND_MODULES[kind].copy(kind, value)
            else:
                replica._structures[kind, name] = value
        replica._calls.update(snapshot["calls"])
        replica._meta = {name: dict(meta) for name, meta in snapshot.get("meta", {}).items()}
        replica._written = {name: dict(times) for name, times in snapshot.get("written", {}).items()}
        replica._fences = dict(snapshot.get("fences", {}))
        return replica

    # -- expiry and eviction (the owner) --------------------------------------------------------------------

    def _alive(self, name: str, key: bytes, now: float) -> bool:
        meta = self._meta.get(name)
        times = meta.get(key) if meta else None
        if times is None:
            return True
        expires_at, max_idle, written_at = times
        if expires_at is not None and now >= expires_at:
            return False
        if max_idle is not None:
            touched = self._touched.get(name)
            last = max(written_at, self._idle_since, touched.get(key, 0.0) if touched else 0.0)
            if now - last >= max_idle:
                return False
        return True

    def _touch(self, name: str, key: bytes) -> None:
        touched = self._touched.get(name)
        if touched is not None:
            touched[key] = self._clock()
            touched.move_to_end(key)

    def due(self) -> dict:
        """``{map name: [keys]}`` whose time is up (the owner writes an "expire" for them)."""
        now = self._clock()
        return {name: keys for name, meta in self._meta.items()
                if (keys := [key for key in meta if not self._alive(name, key, now)])}

    def map_size(self, name: str) -> int:
        return len(self._structures.get((MAP, name)) or ())

    def map_entries(self, name: str) -> dict:
        """Map ``name``'s entries here, ``{key bytes: value bytes}`` (read only; expired ones until swept)."""
        return self._structures.get((MAP, name)) or {}

    def structures(self) -> list[tuple[str, str, int]]:
        """``(kind, name, size)`` of each structure here (a counter's size is 1)."""
        return [(kind, name, len(value) if kind == MAP else len(value["items"]) if kind == QUEUE else
                 _KIND_MODULES[kind].size(kind, value) if kind in _KIND_MODULES else 1)
                for (kind, name), value in self._structures.items()]

    def destroy(self, kind: str, name: str) -> bool:
        """Drop a structure's part here (not replicated: ``destroy`` runs on every replica)."""
        return self._structures.pop((kind, name), None) is not None

    # -- reads ---------------------------------------------------------------------------------------

    def _read(self, op: Op):
        value = self._structures.get((op.kind, op.name))
        action, args = op.action, op.args
        if op.kind == MAP:
            entries = value or {}
            if self._meta.get(op.name) or self._touched.get(op.name) is not None:
                return self._read_timed(op.name, entries, action, args)
            if action == "get":
                return entries.get(args[0])
            if action == "contains":
                return args[0] in entries
            if action == "size":
                return len(entries)
            if action == "keys":
                return list(entries)
            if action == "entries":
                return list(entries.items())
            return {key: entries[key] for key in args[0] if key in entries}  # get_all
        if op.kind == QUEUE:
            queue = value or {"items": (), "unfinished": 0}
            if action == "size":
                return len(queue["items"])
            if action == "peek":
                return queue["items"][0] if queue["items"] else None
            return queue["unfinished"]
        return value or 0  # a counter's get

    def _read_timed(self, name: str, entries: dict, action: str, args: tuple):
        """A read of a map with times: an entry whose time is up is absent; a read entry is used."""
        now = self._clock()
        if name in self._meta:  # (a promoted owner has no uses yet: they start with its first read)
            self._touched.setdefault(name, collections.OrderedDict())
        if action in ("get", "contains"):
            key = args[0]
            if key not in entries or not self._alive(name, key, now):
                return None if action == "get" else False
            self._touch(name, key)
            return entries[key] if action == "get" else True
        if action == "get_all":
            found = {key: entries[key] for key in args[0] if key in entries and self._alive(name, key, now)}
            for key in found:
                self._touch(name, key)
            return found
        live = [key for key in entries if self._alive(name, key, now)]
        if action == "size":
            return len(live)
        if action == "keys":
            return live
        return [(key, entries[key]) for key in live]  # entries

    # -- map writes: (result, effects) -----------------------------------------------------------------

    def _get(self, name: str, key: bytes):
        """The value of ``key`` in map ``name`` (None if absent, or its time is up)."""
        entries = self._structures.get((MAP, name))
        value = entries.get(key) if entries else None
        if value is not None and self._meta.get(name) and not self._alive(name, key, self._clock()):
            return None
        return value

    def _set(self, name: str, key: bytes, value: bytes) -> list:
        """The effects of setting ``key``: the value, and its times when the map's limits give it some."""
        ttl, max_idle, max_size = self._limits
        # "add" and "set" do the same; listeners tell an entry added from one updated.
        effect = (MAP, name, "add" if self._get(name, key) is None else "set",
                  (key, value, self._clock()) if self.keep_times else (key, value))
        if max_idle is not None or max_size is not None:
            self._touched.setdefault(name, collections.OrderedDict())
            self._touch(name, key)
        if ttl is None and max_idle is None:
            return [effect]
        now = self._clock()
        return [effect, (MAP, name, "meta", (key, None if ttl is None else now + ttl, max_idle, now))]

    def _map_put(self, name, key, value):
        return self._get(name, key), self._set(name, key, value)

    def _map_set(self, name, key, value):
        return None, self._set(name, key, value)

    def _map_put_if_absent(self, name, key, value):
        old = self._get(name, key)
        return old, ([] if old is not None else self._set(name, key, value))

    def _map_replace(self, name, key, value):
        old = self._get(name, key)
        return old, ([] if old is None else self._set(name, key, value))

    def _map_replace_if_same(self, name, key, expected, value):
        same = self._get(name, key) == expected
        return same, (self._set(name, key, value) if same else [])

    def _map_remove(self, name, key):
        old = self._get(name, key)
        return old, ([] if old is None else [(MAP, name, "del", (key,))])

    def _map_remove_if_same(self, name, key, expected):
        same = self._get(name, key) == expected and expected is not None
        return same, ([(MAP, name, "del", (key,))] if same else [])

    def _map_delete(self, name, key):
        present = self._get(name, key) is not None
        return present, ([(MAP, name, "del", (key,))] if present else [])

    def _map_put_all(self, name, pairs):
        return None, [effect for key, value in pairs for effect in self._set(name, key, value)]

    def _map_clear(self, name):
        count = self.map_size(name)
        return count, ([(MAP, name, "clear", ())] if count else [])

    def _map_merge(self, name, key, value, written_at, policy):
        """After a split healed: an entry of the smaller side, set here if the key is absent
        (put_if_absent), or also if this side's was written before it (latest_update)."""
        old = self._get(name, key)
        if old is not None:
            mine = (self._written.get(name) or {}).get(key)
            if policy != "latest_update" or written_at is None or (mine is not None and mine >= written_at):
                return False, []
        at = written_at if written_at is not None else self._clock()
        args = (key, value, at) if self.keep_times or written_at is not None else (key, value)
        return True, [(MAP, name, "add" if old is None else "set", args)]

    def written_at(self, name: str, key: bytes):
        """When the entry ``key`` was written (kept with merge_policy = latest_update), or None."""
        return (self._written.get(name) or {}).get(key)

    def _map_expire(self, name, keys):
        """The owner's sweep: the entries of ``keys`` whose time is still up go (as "expired")."""
        now = self._clock()
        entries = self._structures.get((MAP, name)) or {}
        gone = [key for key in keys if key in entries and not self._alive(name, key, now)]
        return len(gone), [(MAP, name, "expire", (key,)) for key in gone]

    def _map_evict(self, name, keys):
        """Over its max_size: the least recently used entries go (as "evicted")."""
        entries = self._structures.get((MAP, name)) or {}
        gone = [key for key in keys if key in entries]
        return len(gone), [(MAP, name, "evict", (key,)) for key in gone]

    # -- queue writes ------------------------------------------------------------------------------------

    def _queue(self, name: str) -> dict:
        return self._structures.get((QUEUE, name)) or {"items": (), "unfinished": 0}

    def _queue_offer(self, name, item, maxsize=0):
        if 0 < maxsize <= len(self._queue(name)["items"]):
            return False, []
        return True, [(QUEUE, name, "push", ((item,),))]

    def _queue_offer_all(self, name, items, maxsize=0):
        room = len(items) if maxsize <= 0 else max(0, maxsize - len(self._queue(name)["items"]))
        taken = tuple(items[:room])
        return len(taken), ([(QUEUE, name, "push", (taken,))] if taken else [])

    def _queue_poll(self, name, max_items=1):
        items = self._queue(name)["items"]
        taken = [items[index] for index in range(min(max_items, len(items)))]
        return taken, ([(QUEUE, name, "pop", (len(taken),))] if taken else [])

    def _queue_task_done(self, name):
        unfinished = self._queue(name)["unfinished"]
        if unfinished <= 0:
            raise StoreError("task_done() called too many times")
        return None, [(QUEUE, name, "unfinished", (unfinished - 1,))]

    def _queue_clear(self, name):
        queue = self._queue(name)
        count = len(queue["items"])
        if not count:
            return 0, []
        # Items cleared were never got, and will never be done: join no longer waits for them.
        return count, [(QUEUE, name, "pop", (count,)), (QUEUE, name, "unfinished", (max(0, queue["unfinished"] - count),))]

    def _queue_merge(self, name, items):
        """After a split healed: the smaller side's items, if this side has no such queue."""
        if (QUEUE, name) in self._structures or not items:
            return False, []
        return True, [(QUEUE, name, "push", (tuple(items),))]

    def _queue_destroy(self, name):
        present = (QUEUE, name) in self._structures
        return present, ([(QUEUE, name, "clear", ())] if present else [])

    # -- counter writes ----------------------------------------------------------------------------------

    def _count(self, name: str) -> int:
        return self._structures.get((COUNTER, name), 0)

    def _counter_set(self, name, value):
        return None, [(COUNTER, name, "value", (value,))]

    def _counter_add_and_get(self, name, delta):
        new = self._count(name) + delta
        return new, [(COUNTER, name, "value", (new,))]

    def _counter_get_and_add(self, name, delta):
        old = self._count(name)
        return old, [(COUNTER, name, "value", (old + delta,))]

    def _counter_merge(self, name, value):
        """After a split healed: the smaller side's count, if this side has no such counter."""
        if (COUNTER, name) in self._structures:
            return False, []
        return True, [(COUNTER, name, "value", (value,))]

    def _counter_destroy(self, name):
        present = (COUNTER, name) in self._structures
        return present, ([(COUNTER, name, "clear", ())] if present else [])

    def _counter_compare_and_set(self, name, expected, value):
        same = self._count(name) == expected
        return same, ([(COUNTER, name, "value", (value,))] if same else [])


# -- effects: what a record does to a replica (owner and backups alike) -----------------------------------


def _effect_set(replica: Replica, kind, name, key, value, written_at=None) -> None:
    replica._structures.setdefault((kind, name), {})[key] = value
    if written_at is not None:
        replica._written.setdefault(name, {})[key] = written_at
    elif replica._written:
        (replica._written.get(name) or {}).pop(key, None)
    meta = replica._meta.get(name)
    if meta:  # a write without times drops the old ones (a "meta" effect after it sets new ones)
        meta.pop(key, None)


def _effect_meta(replica: Replica, kind, name, key, expires_at, max_idle, written_at) -> None:
    replica._meta.setdefault(name, {})[key] = (expires_at, max_idle, written_at)


def _effect_del(replica: Replica, kind, name, key) -> None:
    entries = replica._structures.get((kind, name))
    if entries is not None:
        entries.pop(key, None)
        if not entries:
            del replica._structures[kind, name]
    meta = replica._meta.get(name)
    if meta is not None:
        meta.pop(key, None)
        if not meta:
            del replica._meta[name]
    touched = replica._touched.get(name)
    if touched is not None:
        touched.pop(key, None)
    if replica._written:
        (replica._written.get(name) or {}).pop(key, None)


def _effect_clear(replica: Replica, kind, name) -> None:
    replica._structures.pop((kind, name), None)
    replica._meta.pop(name, None)
    replica._written.pop(name, None)
    touched = replica._touched.get(name)
    if touched is not None:
        touched.clear()


def _queue_state(replica: Replica, name) -> dict:
    return replica._structures.setdefault((QUEUE, name), {"items": collections.deque(), "unfinished": 0})


def _effect_push(replica: Replica, kind, name, items) -> None:
    queue = _queue_state(replica, name)
    queue["items"].extend(items)
    queue["unfinished"] += len(items)


def _effect_pop(replica: Replica, kind, name, count) -> None:
    items = _queue_state(replica, name)["items"]
    for _ in range(count):
        items.popleft()


def _effect_unfinished(replica: Replica, kind, name, value) -> None:
    _queue_state(replica, name)["unfinished"] = value


def _effect_fence(replica: Replica, kind, name, lock, token) -> None:
    replica._fences[lock] = max(token, replica._fences.get(lock, 0))


def _effect_value(replica: Replica, kind, name, value) -> None:
    replica._structures[kind, name] = value


def _on_structures(effect):
    """A list, set, multimap, lock or semaphore effect (``lists``, ``locks``), on the replica's structures."""
    return lambda replica, kind, name, *args: effect(replica._structures, name, *args)


_EFFECTS = {"set": _effect_set, "add": _effect_set, "meta": _effect_meta, "del": _effect_del, "expire": _effect_del,
            "evict": _effect_del, "clear": _effect_clear, "push": _effect_push, "pop": _effect_pop,
            "unfinished": _effect_unfinished, "value": _effect_value, "fence": _effect_fence,
            **{name: _on_structures(getattr(lists, f"effect_{name}")) for name in
               ("list_insert", "list_delete", "list_put", "list_value", "set_add", "set_discard", "mm_add",
                "mm_remove")},
            **{name: _on_structures(getattr(locks, f"effect_{name}")) for name in ("lock_state", "semaphore_state")},
            "topic_publish": _on_structures(ring.effect_topic_publish)}
_KIND_MODULES = {LIST: lists, SET: lists, MULTIMAP: lists, LOCK: locks, SEMAPHORE: locks, TOPIC: ring}  # kept there


def over_capacity(replicas, name: str, max_size: int, partitions: int, owned: int | None = None) -> list:
    """``[(partition, key)]`` to evict so that map ``name`` keeps its share of ``max_size`` in
    ``replicas`` (the partitions one owner holds, ``owned`` of all ``partitions``: its share is
    ``max_size`` times their part, rounded up), least recently used first."""
    replicas = list(replicas)
    share = max(1, -(-max_size * (len(replicas) if owned is None else owned) // partitions))
    extra = sum(replica.map_size(name) for replica in replicas) - share
    if extra <= 0:
        return []
    # The replicas' orders merged, oldest use first (each is lazy: only the first few are made).
    oldest = heapq.merge(*(_least_used_first(replica, name) for replica in replicas if replica.map_size(name)))
    return [(partition, key) for _, partition, key in itertools.islice(oldest, extra)]


def _least_used_first(replica: Replica, name: str):
    """``(last use, partition, key)`` of map ``name``'s entries in ``replica``, least recently used first."""
    entries = replica._structures.get((MAP, name)) or {}
    touched = replica._touched.setdefault(name, collections.OrderedDict())
    if len(touched) < len(entries):  # entries not used since this replica took them: before any use
        for key in entries:
            if key not in touched:
                touched[key] = replica._idle_since
                touched.move_to_end(key, last=False)
    for key, at in touched.items():
        if key in entries:
            yield at, replica.partition, key
