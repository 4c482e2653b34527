"""One member's data service as a state machine without IO: ops in, replication out, acknowledgements back.

::

    proxy --op--> owner: DataNode.on_op(token, partition, op)
                    not the owner (by its table), or op routed by an older table -> Reply(NotOwner)
                    a read, or a write that changed nothing                    -> Reply(result)
                    a write: Send("data.rep", (write id, record)) to each backup, and once every
                    backup acknowledged it                                      -> Reply(result)
    backup:        on_replicate(owner, write id, record) -> Send("data.ack", ok | fenced | want)
                    "want": it lacks records before this one (or the partition): the owner sends
                    a snapshot (Send "data.snap"), whose acknowledgement covers every write in it
    table:         take_table(table): drop what this member no longer holds; a new owner that holds
                    nothing asks the partition's other replicas for it (Send "data.want"); an owner
                    sends its new backups a snapshot; writes waiting for a backup that left stop
                    waiting for it; writes of a partition this member no longer owns are answered
                    NotOwner (the proxy retries them, with the same call id, at the new owner)

Nothing is acknowledged before every backup of the table it was written under applied it, and a
backup refuses records of an older table (``store.Fenced``), so a paused or cut-off ex-owner
cannot acknowledge a write. The layer above moves the messages and calls in on one thread.

Outputs are ``Send(to, message_type, body)`` and ``Reply(token, result, error)``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from ..cluster.partitions import PartitionTable, empty_table
from .store import MAP, SWEEP_INTERVAL, Fenced, Op, OutOfOrder, Record, Replica, StoreError, over_capacity


class NotOwner(StoreError):
    """This member does not own the partition by the newest table it knows (``table_version``),
    or is still receiving its data: ask again after the table (the proxy's retry)."""

    def __init__(self, message: str, table_version: int):
        super().__init__(message)
        self.table_version = table_version

    def __reduce__(self):  # it travels back to the proxy
        return NotOwner, (str(self), self.table_version)


@dataclasses.dataclass(frozen=True)
class Send:
    to: str
    message_type: str
    body: Any


@dataclasses.dataclass(frozen=True)
class Reply:
    token: Any
    result: Any = None
    error: BaseException | None = None
    partition: int = -1
    changed: bool = False  # a write that changed the partition's data (waiters for a change wake)
    effects: tuple = ()  # an acknowledged write's effects (on its first reply only: its listeners' events)


_RESEND = 2.0  # seconds before a record or snapshot that got no answer is sent again
_EARLY = 10_000  # records and snapshots of a table not got yet, kept (the oldest go beyond)


@dataclasses.dataclass
class _Write:
    tokens: list  # the calls it answers: the first try, and retries that came while it waited
    partition: int
    record: Record  # (seq 0: a retry's barrier, answered once the syncing backups restored)
    waiting: set  # backups that have not applied it yet
    sent_at: float = 0.0


class DataNode:
    """The replicas member ``me`` holds and the writes waiting for their backups."""

    def __init__(self, me: str, partitions: int, backup_count: int = 1, *, keep_times: bool = False):
        self.me = me
        self.keep_times = keep_times  # entries' write times (merge_policy = latest_update)
        self.table: PartitionTable = empty_table(partitions, backup_count)
        self.replicas: dict[int, Replica] = {}
        self._wanting: set[int] = set()  # partitions this member owns and waits to receive
        self._writes: dict[int, _Write] = {}
        self._write_ids = itertools.count(1)
        self._answered_none: dict[int, set] = {}  # partition wanted -> replicas that hold nothing of it
        self._early_wants: dict[tuple, int] = {}  # (sender, partition) -> its table, newer than this member's
        self._early: list = []  # (version, message type, sender, body): records and snapshots of a newer table
        self._syncing: dict[int, set] = {}  # partition -> backups sent a snapshot, not yet restored
        self._snapped_at: dict[tuple, float] = {}  # (partition, backup) -> when its snapshot went
        self._now = 0.0  # the time of the last tick
        self._swept_at = 0.0

    @property
    def wanting(self) -> set:
        """The partitions this member owns and still waits to receive."""
        return set(self._wanting)

    @property
    def syncing_partitions(self) -> list:
        """The partitions with a backup still restoring this owner's snapshot."""
        return sorted(self._syncing)

    @property
    def syncing_count(self) -> int:
        """Backups sent a snapshot that have not restored it yet (over all partitions)."""
        return sum(len(backups) for backups in self._syncing.values())

    @property
    def pending_writes(self) -> int:
        """Writes applied here that wait for a backup."""
        return len(self._writes)

    # -- the table -------------------------------------------------------------------------------------

    def take_table(self, table: PartitionTable) -> list:
        """Follow a newer table; returns the messages and replies that follow from it."""
        if table.version <= self.table.version:
            return []
        old, self.table = self.table, table
        out: list = []
        for partition in range(table.partitions):
            row = table.replicas[partition] if table.replicas else ()
            replica = self.replicas.get(partition)
            if self.me not in row:
                self.replicas.pop(partition, None)
                self._wanting.discard(partition)
                continue
            if replica is not None:
                replica.follow(table.version)
            if row[0] != self.me:
                self._wanting.discard(partition)
                continue
            if replica is None:  # owner of what it does not hold: ask its other replicas. Not only those
                # of this member's older table: a member that just joined has none, and the cluster's
                # older table may have named them (it did: a joiner started every partition it took empty).
                held = row[1:]
                if held:
                    self._wanting.add(partition)
                    self._answered_none.pop(partition, None)  # answers by an older table count no more
                    out += [Send(uuid, "data.want", (partition, table.version)) for uuid in held]
                else:  # nobody who could have it: it starts empty
                    self._found_nothing(partition)
                continue
            was = old.replicas[partition] if old.replicas else ()
            promoted = not was or was[0] != self.me
            for uuid in row[1:]:
                # A new backup starts from a snapshot; so does every backup of a promoted owner: a
                # fellow backup may hold a record this one never got (one never acknowledged).
                if promoted or uuid not in was:
                    out.append(self._snapshot_to(uuid, partition, replica))
        for partition, syncing in list(self._syncing.items()):
            row = table.replicas[partition] if table.replicas else ()
            syncing &= set(row[1:]) if row and row[0] == self.me else set()
            if not syncing:
                del self._syncing[partition]
        self._snapped_at = {key: at for key, at in self._snapped_at.items() if key[1] in self._syncing.get(key[0], ())}
        for write_id, write in list(self._writes.items()):
            row = table.replicas[write.partition] if table.replicas else ()
            if not row or row[0] != self.me:
                del self._writes[write_id]
                out += [Reply(token, error=NotOwner(
                    f"partition {write.partition} moved to another member before its write was backed up",
                    table.version)) for token in write.tokens]
                continue
            # A backup that left no longer counts; a new one does: it restores a snapshot that holds the write.
            syncing = self._syncing.get(write.partition, set())
            write.waiting = (write.waiting & set(row[1:])) | syncing
            if write.record.seq and write.waiting - syncing:
                # Still this member's: the record goes again by this table (a backup that took it
                # first refused it as "fenced", and waits for it).
                write.record = dataclasses.replace(write.record, table_version=table.version)
                write.sent_at = self._now
                out += [Send(uuid, "data.rep", (write_id, write.record)) for uuid in write.waiting - syncing]
            out += self._maybe_done(write_id)
        for (sender, partition), version in list(self._early_wants.items()):
            if version <= table.version:  # this member knows that table now: it can answer
                del self._early_wants[sender, partition]
                out += self.on_want(sender, partition, version)
        early, self._early = self._early, []
        for version, message_type, sender, body in early:
            if version > table.version:
                self._early.append((version, message_type, sender, body))
            elif message_type == "data.rep":
                out += self.on_replicate(sender, *body)
            else:
                out += self.on_snapshot(sender, *body)
        return out

    def _snapshot_to(self, backup: str, partition: int, replica: Replica) -> Send:
        self._syncing.setdefault(partition, set()).add(backup)
        self._snapped_at[partition, backup] = self._now
        return Send(backup, "data.snap", (partition, replica.snapshot()))

    def abandon(self) -> list:
        """This node's state is given up (its member rejoins): every waiting write is told to retry."""
        out = [Reply(token, error=NotOwner(f"partition {write.partition}: its owner left the cluster before "
                                           "the write was backed up", self.table.version))
               for write in self._writes.values() for token in write.tokens]
        self._writes.clear()
        return out

    def tick(self, now: float) -> list:
        """Time passed (``now``, monotonic seconds): a record or snapshot unanswered for ``_RESEND``
        seconds goes again (a message the links lost; a backup skips what it holds already)."""
        self._now = now
        out: list = []
        for write_id, write in self._writes.items():
            if write.record.seq and write.waiting and now - write.sent_at >= _RESEND:
                write.sent_at = now
                out += [Send(uuid, "data.rep", (write_id, write.record)) for uuid in write.waiting]
        for partition, backups in list(self._syncing.items()):
            replica = self.replicas.get(partition)
            for backup in list(backups):
                if replica is not None and now - self._snapped_at.get((partition, backup), now) >= _RESEND:
                    out.append(self._snapshot_to(backup, partition, replica))
        if now - self._swept_at >= SWEEP_INTERVAL:
            self._swept_at = now
            out += self._sweep()
        return out

    def _owned(self) -> dict:
        return {partition: replica for partition, replica in self.replicas.items()
                if self.table.owner(partition) == self.me and partition not in self._wanting}

    def _sweep(self) -> list:
        """Entries whose ttl or max_idle is up go, as writes of this owner (backed up, and seen by
        listeners as "expired"); their calls answer nobody (token None)."""
        out: list = []
        for partition, replica in self._owned().items():
            for name, keys in replica.due().items():
                out += self.on_op(None, partition, Op(MAP, name, "expire", (keys,), None, self.table.version))
        return out

    def _evict(self, op: Op) -> list:
        """After a write to a map with a max_size: its least recently used entries over this owner's share go."""
        out: list = []
        for partition, key in over_capacity(self._owned().values(), op.name, op.limits[2], self.table.partitions):
            out += self.on_op(None, partition, Op(MAP, op.name, "evict", ((key,),), None, self.table.version))
        return out

    def _found_nothing(self, partition: int) -> None:
        self._wanting.discard(partition)
        replica = self.replicas[partition] = Replica(partition)
        replica.keep_times = self.keep_times
        replica.follow(self.table.version)

    # -- the owner ---------------------------------------------------------------------------------------

    def on_op(self, token, partition: int, op: Op) -> list:
        """An op for ``partition`` from a proxy; answered now, or once its backups applied it."""
        owner = self.table.owner(partition)
        if owner != self.me or partition in self._wanting or op.table_version > self.table.version:
            why = ("is receiving its data" if owner == self.me and partition in self._wanting else
                   f"is owned by {owner}" if owner != self.me else "has a newer table than this member")
            return [Reply(token, error=NotOwner(f"partition {partition} {why} (table version "
                                                f"{self.table.version})", self.table.version))]
        replica = self.replicas[partition]
        retry = op.call_id is not None and replica.applied(op.call_id)
        if retry:  # its first try may still wait for its backups: so does the retry
            pending = next((w for w in self._writes.values() if w.partition == partition
                            and w.record.call_id == op.call_id), None)
            if pending is not None:
                pending.tokens.append(token)
                return []
        try:
            outcome = replica.execute(op)
        except Fenced as exc:
            return [Reply(token, error=NotOwner(str(exc), self.table.version))]
        except StoreError as exc:
            return [Reply(token, error=exc)]
        backups = self.table.backups(partition)
        syncing = self._syncing.get(partition)
        if retry and syncing:
            # Applied here before (as a backup promoted since, say), and a backup is still restoring
            # the snapshot that brings it: answered once that backup holds everything up to now.
            write_id = next(self._write_ids)
            # (seq 0: the call's record is in every snapshot sent since, so any restored one will do)
            barrier = Record(partition, 0, self.table.version, op.call_id, outcome.result, ())
            self._writes[write_id] = _Write([token], partition, barrier, set(syncing), self._now)
            return []
        evicted = self._evict(op) if op.limits and op.limits[2] and outcome.record is not None else []
        if outcome.record is None or not backups:
            effects = outcome.record.effects if outcome.record is not None else ()
            return [Reply(token, outcome.result, partition=partition, changed=bool(effects), effects=effects)] + evicted
        write_id = next(self._write_ids)
        self._writes[write_id] = _Write([token], partition, outcome.record, set(backups), self._now)
        return [Send(uuid, "data.rep", (write_id, outcome.record)) for uuid in backups] + evicted

    def on_ack(self, sender: str, write_id: int, answer: str, partition: int, table_version: int | None = None,
               refused: int | None = None) -> list:
        """A backup's answer to ``data.rep`` or ``data.snap``: "ok", "fenced" (with the table it
        follows, and the table of the record it refused) or "want"."""
        if answer == "want":  # it lacks what comes before: all of it, as a snapshot
            replica = self.replicas.get(partition)
            if replica is None or self.table.owner(partition) != self.me or sender not in self.table.backups(partition):
                return []  # (not a backup by this table: a record sent before it left, read by it since)
            return [self._snapshot_to(sender, partition, replica)]
        out: list = []
        if answer == "fenced":
            write = self._writes.get(write_id)
            if write is None or sender not in write.waiting or not write.record.seq:
                return out
            if table_version is not None and table_version > self.table.version:
                # The backup follows a newer table: the write waits until this member has it too
                # (take_table: moved away -> NotOwner; still its own -> the record goes again).
                return out
            # The record was sent by an older table than this member follows now (it took a table
            # while the record travelled): it goes again, by this table.
            if refused is not None and refused >= self.table.version:
                return out  # (a record of this table refused: another cluster's table, no ping-pong)
            if self.table.owner(partition) != self.me or sender not in self.table.backups(partition):
                return out  # (take_table answers it)
            write.record = dataclasses.replace(write.record, table_version=self.table.version)
            write.sent_at = self._now
            return [Send(sender, "data.rep", (write_id, write.record))]
        write = self._writes.get(write_id)
        if write is not None:
            write.waiting.discard(sender)
            out += self._maybe_done(write_id)
        return out

    def on_snapshot_applied(self, sender: str, partition: int, seq: int) -> list:
        """A backup restored a snapshot up to record ``seq``: it holds every write up to it."""
        out: list = []
        syncing = self._syncing.get(partition)
        if syncing is not None:
            syncing.discard(sender)
            self._snapped_at.pop((partition, sender), None)
            if not syncing:
                del self._syncing[partition]
        for write_id, write in list(self._writes.items()):
            if write.partition == partition and write.record.seq <= seq:
                write.waiting.discard(sender)
                out += self._maybe_done(write_id)
        return out

    def _maybe_done(self, write_id: int) -> list:
        write = self._writes.get(write_id)
        if write is None or write.waiting:
            return []
        del self._writes[write_id]
        changed = bool(write.record.effects)
        return [Reply(token, write.record.result, partition=write.partition, changed=changed,
                      effects=write.record.effects if number == 0 else ()) for number, token in enumerate(write.tokens)]

    # -- a backup ------------------------------------------------------------------------------------------

    def _vouched(self, sender: str, partition: int, table_version: int, *, owner: bool) -> bool:
        """Whether ``sender`` may send this partition's data here: by this member's table (the one
        the message was sent by), it is the owner (or, ``owner=False``, a replica) and this member a replica."""
        if table_version != self.table.version:
            return False
        row = self.table.replicas[partition] if self.table.replicas else ()
        return self.me in row and (row[0] == sender if owner else sender in row)

    def _too_early(self, table_version: int, message_type: str, sender: str, body: tuple) -> bool:
        """A record or snapshot sent by a table this member has not got yet: kept until it has
        (judged by that table, not by this member's older one, nor trusted for being newer: a
        member that rejoins starts with no table, and reads what was sent to it before it left)."""
        if table_version <= self.table.version:
            return False
        if len(self._early) >= _EARLY:
            self._early.pop(0)  # (its sender sends it again: see tick)
        self._early.append((table_version, message_type, sender, body))
        return True

    def on_replicate(self, sender: str, write_id: int, record: Record) -> list:
        """The owner's record of a write: applied in order, or refused saying why."""
        if self._too_early(record.table_version, "data.rep", sender, (write_id, record)):
            return []
        if not self._vouched(sender, record.partition, record.table_version, owner=True):
            return [Send(sender, "data.ack", (write_id, "fenced", record.partition, self.table.version,
                                              record.table_version))]
        replica = self.replicas.get(record.partition)
        if replica is None:
            return [Send(sender, "data.ack", (write_id, "want", record.partition))]
        try:
            replica.replicate(record)
        except Fenced:
            return [Send(sender, "data.ack", (write_id, "fenced", record.partition, self.table.version,
                                              record.table_version))]
        except OutOfOrder:
            return [Send(sender, "data.ack", (write_id, "want", record.partition))]
        return [Send(sender, "data.ack", (write_id, "ok", record.partition))]

    def on_snapshot(self, sender: str, partition: int, snapshot: dict) -> list:
        """A whole partition from its owner (a new backup, one that fell behind, the backups of a
        promoted owner), or from a backup for an owner that holds nothing of it yet. It replaces
        what this member held: the sender's is the one acknowledged writes are in."""
        if partition in self._wanting:  # this member owns it and asked its replicas
            # Only an answer to that ask will do: one sent by its table or a newer one (a snapshot
            # sent to this member under an older table, read only now, is stale).
            if snapshot["table_version"] < self.table.version or not self._vouched(
                    sender, partition, self.table.version, owner=False):
                return []
        elif self._too_early(snapshot["table_version"], "data.snap", sender, (partition, snapshot)):
            return []
        elif not self._vouched(sender, partition, snapshot["table_version"], owner=True):
            return []
        replica = self.replicas[partition] = Replica.restore(snapshot)
        replica.keep_times = self.keep_times
        replica.follow(self.table.version)
        if partition in self._wanting:  # the owner received its data: its backups start from it
            self._wanting.discard(partition)
            self._answered_none.pop(partition, None)
            return [self._snapshot_to(uuid, partition, replica) for uuid in self.table.backups(partition)]
        return [Send(sender, "data.snapped", (partition, replica.seq))]

    def on_want(self, sender: str, partition: int, table_version: int) -> list:
        """The partition's new owner (by its table ``table_version``) holds nothing of it: send it
        what this member holds. Asked by a table this member has not got yet, it answers once it
        has (by its older table the sender owns nothing, and "none" would make it start empty)."""
        if table_version > self.table.version:
            self._early_wants[sender, partition] = table_version
            return []
        replica = self.replicas.get(partition)
        if replica is None or self.table.owner(partition) != sender:
            return [Send(sender, "data.none", (partition, self.table.version))]
        return [Send(sender, "data.snap", (partition, replica.snapshot()))]

    def on_none(self, sender: str, partition: int, table_version: int) -> list:
        """A replica asked for ``partition`` holds nothing of it either (by its table ``table_version``;
        an answer by another table than this member's is left: the next table asks again)."""
        row = self.table.replicas[partition] if self.table.replicas else ()
        if partition not in self._wanting or not row or row[0] != self.me or table_version != self.table.version:
            return []
        answered = self._answered_none.setdefault(partition, set())
        answered.add(sender)
        if set(row[1:]) <= answered:
            del self._answered_none[partition]
            self._found_nothing(partition)
        return []
