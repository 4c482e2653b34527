"""The partition table: which member owns each partition of the data, and which back it up.

::

    key --key_bytes--> canonical pickle --crc32 % partitions--> partition id
    master: member list changes --plan(previous table, data members)--> table version + 1
            every partition: [owner, backup 1, ..., backup k] on distinct members
            (on distinct hosts where there are enough), pushed to members and clients

A key's partition is a stable function of its serialized form, never of ``hash()``
(which differs between processes for strings). So keys compare by serialized form:
``1`` and ``1.0`` are different keys, as in Hazelcast, though ``1 == 1.0`` in Python.
The form is a pickle without memo (so equal keys pickle alike however they share
objects); sets, frozensets and dicts are refused inside keys, because their order,
and so their pickle, can differ between processes.

``plan`` is a pure function (no IO, no clock): the previous table and the data
members in, the next table out. It keeps what it can, which keeps data still:
- a member that left takes its replicas with it; its partitions' surviving replicas
  move up, so a backup (which holds every acknowledged write) becomes the owner;
- each partition is filled up to ``min(backup_count + 1, members)`` replicas by the
  least-loaded members, preferring a host the partition is not on yet;
- then each replica rank (owners first) is balanced to within one partition per member,
  by swapping roles with a deeper rank of the same partition (a backup becomes the owner)
  (no data moves), else by handing the replica to an under-loaded member.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import logging
import pickle
import zlib
from collections.abc import Iterable, Sequence

log = logging.getLogger("grid.membership")

DEFAULT_PARTITIONS = 271
MAX_BACKUPS = 6

_PLAIN_KEYS = (str, bytes, int)


def key_bytes(key) -> bytes:
    """The canonical serialized form of a distributed structure's key.

    Raises:
        TypeError: the key holds a set, frozenset or dict (their pickle depends on the
            process), or cannot be pickled at all; the message says what to use instead.
    """
    if type(key) in _PLAIN_KEYS:  # the common keys: the C pickler, which never memoizes these alone
        return pickle.dumps(key, 5)
    _check_key(key, key)
    file = io.BytesIO()
    pickler = pickle.Pickler(file, 5)
    pickler.fast = True  # no memo: ("a", "a") pickles alike whether or not the two are one object
    try:
        pickler.dump(key)
    except Exception as exc:
        raise TypeError(f"key {key!r:.80} cannot be used as a key of a distributed structure: it cannot be "
                        f"pickled ({type(exc).__name__}: {exc}); use plain data (str, int, bytes, tuples)") from exc
    return file.getvalue()


def _check_key(key, part) -> None:
    kind = type(part)
    if kind in (set, frozenset, dict):
        raise TypeError(f"key {key!r:.80} holds a {kind.__name__}, whose serialized form differs between processes, "
                        "so it cannot name one partition; use a sorted tuple instead")
    if kind in (tuple, list):
        for item in part:
            _check_key(key, item)


def partition_of(key, count: int = DEFAULT_PARTITIONS) -> int:
    """The partition (0 .. count - 1) of ``key``: the same in every process, on every host."""
    return partition_of_bytes(key_bytes(key), count)


def partition_of_bytes(data: bytes, count: int = DEFAULT_PARTITIONS) -> int:
    """The partition of a key already in its canonical form (``key_bytes``)."""
    return zlib.crc32(data) % count


@dataclasses.dataclass(frozen=True)
class PartitionTable:
    """Version ``version`` of the table: ``replicas[p]`` is partition p's (owner, backup 1, ...).

    Members are named by uuid. An empty table (no data member yet) has no replicas.
    """

    version: int
    partitions: int
    backup_count: int
    replicas: tuple[tuple[str, ...], ...]

    def owner(self, partition: int) -> str | None:
        row = self.replicas[partition] if self.replicas else ()
        return row[0] if row else None

    def backups(self, partition: int) -> tuple[str, ...]:
        return self.replicas[partition][1:] if self.replicas else ()

    def owned_by(self, uuid: str) -> list[int]:
        """The partitions ``uuid`` owns."""
        return [p for p, row in enumerate(self.replicas) if row and row[0] == uuid]

    def backed_up_by(self, uuid: str) -> list[int]:
        """The partitions ``uuid`` holds a backup of."""
        return [p for p, row in enumerate(self.replicas) if uuid in row[1:]]

    def members(self) -> set[str]:
        return {uuid for row in self.replicas for uuid in row}

    def to_wire(self) -> dict:
        """The table as it travels: each member's uuid once, and the rows as indexes into them."""
        uuids = sorted(self.members())
        index = {uuid: number for number, uuid in enumerate(uuids)}
        return {"version": self.version, "partitions": self.partitions, "backup_count": self.backup_count,
                "members": uuids, "replicas": [[index[uuid] for uuid in row] for row in self.replicas]}

    @classmethod
    def from_wire(cls, data: dict) -> PartitionTable:
        """The table another member sent (raises ValueError if it is malformed)."""
        try:
            version, count, backups = int(data["version"]), int(data["partitions"]), int(data["backup_count"])
            uuids = [str(uuid) for uuid in data["members"]]
            replicas = tuple(tuple(uuids[number] for number in row) for row in data["replicas"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"a malformed partition table: {type(exc).__name__}: {exc}") from exc
        if replicas and len(replicas) != count:
            raise ValueError(f"a partition table of {count} partitions with {len(replicas)} rows")
        return cls(version, count, backups, replicas)


def received_table(wire) -> PartitionTable | None:
    """The table a member list carried (None if it carried none, or one that is malformed: logged)."""
    if wire is None:
        return None
    try:
        return PartitionTable.from_wire(wire)
    except ValueError as exc:
        log.warning("ignoring a partition table: %s", exc)
        return None


def empty_table(partitions: int = DEFAULT_PARTITIONS, backup_count: int = 1) -> PartitionTable:
    return PartitionTable(0, partitions, backup_count, ())


def plan(previous: PartitionTable, members: Sequence[tuple[str, str]], *, partitions: int | None = None,
         backup_count: int | None = None) -> PartitionTable:
    """The next table for the data ``members``, ``(uuid, host)`` pairs, in the master's order.

    Keeps the previous table's replicas on members that are still there (see the module
    docstring). Returns ``previous`` itself when nothing changes.

    Raises:
        ValueError: ``backup_count`` over MAX_BACKUPS, or a partition count that differs
            from the previous table's (partitions never change in a running cluster).
    """
    count = previous.partitions if partitions is None else partitions
    backups = previous.backup_count if backup_count is None else backup_count
    if not 0 <= backups <= MAX_BACKUPS:
        raise ValueError(f"backup_count must be 0 to {MAX_BACKUPS}, not {backups}")
    if count < 1:
        raise ValueError(f"partitions must be 1 or more, not {count}")
    if previous.replicas and count != previous.partitions:
        raise ValueError(f"the cluster has {previous.partitions} partitions; it cannot change to {count}")
    hosts = dict(members)
    order = [uuid for uuid, _ in members]
    if not order:
        rows: list[list[str]] = []
    else:
        width = min(backups + 1, len(order))
        old = previous.replicas or ((),) * count
        rows = [[uuid for uuid in row if uuid in hosts][:width] for row in old]
        holders = [frozenset(row) for row in rows]  # who has each partition's data now
        _fill(rows, order, hosts, width)
        _spread_hosts(rows, order, hosts)
        _balance_holders(rows, order, hosts, holders)
        _balance_owners(rows, order, holders)
    replicas = tuple(tuple(row) for row in rows)
    if replicas == previous.replicas and count == previous.partitions and backups == previous.backup_count:
        return previous
    return PartitionTable(previous.version + 1, count, backups, replicas)


def keep_holders(planned: PartitionTable, previous: PartitionTable, alive) -> PartitionTable:
    """``planned`` with each row followed by the replicas of ``previous``'s row it dropped that are
    still ``alive``: they hold the partition's data until the new replicas have it (a kill in
    between must not take the last copy). The master trims them once the owner says its
    replicas are in sync (``trimmed``). ``planned`` itself when it drops nobody alive."""
    if not planned.replicas or not previous.replicas:
        return planned
    rows = tuple(new + tuple(uuid for uuid in old if uuid in alive and uuid not in new)
                 for new, old in zip(planned.replicas, previous.replicas))
    if rows == planned.replicas:
        return planned
    return dataclasses.replace(planned, replicas=rows)


def width(table: PartitionTable, data_members: int) -> int:
    """Replicas a settled row has: the owner and ``backup_count`` backups, as members allow."""
    return min(table.backup_count + 1, max(1, data_members))


def trimmed(table: PartitionTable, partitions, data_members: int) -> PartitionTable:
    """``table`` (next version) with the rows of ``partitions`` cut back to their settled width."""
    keep = width(table, data_members)
    rows = list(table.replicas)
    for partition in partitions:
        rows[partition] = rows[partition][:keep]
    return dataclasses.replace(table, version=table.version + 1, replicas=tuple(rows))


def _host_clash(row: list[str], hosts: dict, uuid: str, skip: int = -1) -> bool:
    host = hosts[uuid]
    return any(hosts[other] == host for index, other in enumerate(row) if index != skip and other != uuid)


def _quotas(order: list[str], counts: dict, total: int) -> dict:
    """How many of ``total`` slots each member should hold: an even share, the extra ones to
    those holding the most now (so the fewest move), then by order."""
    low, extra = divmod(total, len(order))
    position = {uuid: index for index, uuid in enumerate(order)}
    ranked = sorted(order, key=lambda uuid: (-counts[uuid], position[uuid]))
    return {uuid: low + (1 if index < extra else 0) for index, uuid in enumerate(ranked)}


def _fill(rows: list[list[str]], order: list[str], hosts: dict, width: int) -> None:
    """Give every partition ``width`` replicas: each new one to the least-loaded member not in the
    partition, on a host the partition is not on if there is one."""
    load = {uuid: 0 for uuid in order}
    for row in rows:
        for uuid in row:
            load[uuid] += 1
    # How often two members hold a partition together: spreading each member's partners over all
    # the others means a member's death spreads its partitions' new replicas over all of them.
    together: collections.Counter = collections.Counter()
    for row in rows:
        for first, second in itertools.combinations(row, 2):
            together[first, second] += 1
            together[second, first] += 1
    position = {uuid: index for index, uuid in enumerate(order)}
    for row in rows:
        while len(row) < width:
            best = min((uuid for uuid in order if uuid not in row),
                       key=lambda uuid: (_host_clash(row, hosts, uuid), load[uuid],
                                         sum(together[uuid, other] for other in row), position[uuid]))
            for other in row:
                together[best, other] += 1
                together[other, best] += 1
            row.append(best)
            load[best] += 1


def _spread_hosts(rows: list[list[str]], order: list[str], hosts: dict) -> None:
    """Where two replicas of a partition share a host and a host it is not on has members (one came
    since), move the deepest such replica there, to the least-loaded member of such a host."""
    load = collections.Counter(uuid for row in rows for uuid in row)
    all_hosts = set(hosts.values())
    for row in rows:
        used = {hosts[uuid] for uuid in row}
        while len(used) < min(len(row), len(all_hosts)):
            rank = max(index for index, uuid in enumerate(row) if _host_clash(row, hosts, uuid, index))
            taker = min((uuid for uuid in order if hosts[uuid] not in used), key=lambda uuid: load[uuid])
            load[row[rank]] -= 1
            load[taker] += 1
            row[rank] = taker
            used = {hosts[uuid] for uuid in row}


def _balance_holders(rows: list[list[str]], order: list[str], hosts: dict, holders: list[frozenset]) -> None:
    """Even out how many replicas each member holds (to within one), moving as few as it can, never
    putting two replicas of a partition on one host where they were not, and never moving the last
    replica that holds the data of a partition that has backups (it owns while the others copy)."""
    load = {uuid: 0 for uuid in order}
    for row in rows:
        for uuid in row:
            load[uuid] += 1
    quota = _quotas(order, load, sum(load.values()))
    for row, held in zip(rows, holders):
        for rank in reversed(range(len(row))):  # backups first: an owner keeps its partition if it can
            giver = row[rank]
            if load[giver] <= quota[giver]:
                continue
            if len(row) > 1 and giver in held and sum(uuid in held for uuid in row) == 1:
                continue
            clashes_now = _host_clash(row, hosts, giver, rank)
            taker = next((uuid for uuid in order if load[uuid] < quota[uuid] and uuid not in row
                          and (clashes_now or not _host_clash(row, hosts, uuid, rank))), None)
            if taker is None:
                continue
            if rank == 0 and len(row) > 1:  # the owner gives up its replica: its first backup owns now
                row.pop(0)
                row.append(taker)  # ... and the replica (its data) moves to the taker, as a backup
            else:
                row[rank] = taker  # the replica (and its data) moves to the taker
            load[giver] -= 1
            load[taker] += 1


def _balance_owners(rows: list[list[str]], order: list[str], holders: list[frozenset]) -> None:
    """Even out how many partitions each member owns, by making another of a partition's replicas its
    owner (the old owner takes that replica's rank): roles change, no data moves. Only a member that
    holds the partition's data already (``holders``; any, for a partition nobody held) may take
    over: a replica being migrated in becomes the owner in a later table, once it has the data.

    One hand-over may need a chain (a gives a partition to b, which gives one to c, below its
    quota): each round finds the shortest such chain from a member over its quota, breadth first.
    """
    for row, held in zip(rows, holders):  # an owner without the data (a backup moved in its place):
        if held and row[0] not in held:  # a holder in the row owns instead
            rank = next((rank for rank, uuid in enumerate(row) if uuid in held), None)
            if rank is not None:
                row[0], row[rank] = row[rank], row[0]
    owned = {uuid: 0 for uuid in order}
    for row in rows:
        owned[row[0]] += 1
    quota = _quotas(order, owned, len(rows))
    owned_rows: dict[str, list[int]] = {uuid: [] for uuid in order}
    for index, row in enumerate(rows):
        owned_rows[row[0]].append(index)
    while True:
        sources = [uuid for uuid in order if owned[uuid] > quota[uuid]]
        if not sources:
            return
        came_from: dict[str, tuple[str, int] | None] = {uuid: None for uuid in sources}
        frontier, end = list(sources), None
        while frontier and end is None:
            following = []
            for giver in frontier:
                for index in owned_rows[giver]:
                    held = holders[index]
                    for taker in rows[index][1:]:
                        if taker in came_from or (held and taker not in held):
                            continue
                        came_from[taker] = (giver, index)
                        if owned[taker] < quota[taker]:
                            end = taker
                            break
                        following.append(taker)
                    if end is not None:
                        break
                if end is not None:
                    break
            frontier = following
        if end is None:
            return  # no chain left: as even as these replica sets allow
        owned[end] += 1
        taker = end
        while came_from[taker] is not None:
            giver, index = came_from[taker]
            row = rows[index]
            rank = row.index(taker)
            row[0], row[rank] = taker, giver
            owned_rows[giver].remove(index)
            owned_rows[taker].append(index)
            taker = giver
        owned[taker] -= 1
