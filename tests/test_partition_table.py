"""The partition table (grid.cluster.partitions): key hashing and the master's plan, as pure functions."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grid.cluster import partitions
from grid.cluster.partitions import MAX_BACKUPS, PartitionTable, empty_table, key_bytes, partition_of, plan

KEYS = ["user:1", "", "ünïcode", b"raw", 0, 1, -1, 2**80, 1.0, 2.5, None, True, (1, "a"), ("a", "a"),
        ((1, 2), (3, (4, b"x")))]


def test_a_keys_partition_is_the_same_in_every_process_whatever_its_hash_seed():
    script = ("import json, sys; from grid.cluster.partitions import partition_of; "
              f"print(json.dumps([partition_of(k) for k in {KEYS!r}]))")
    seen = set()
    for seed in ("0", "1", "12345"):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONHASHSEED=seed))
        assert done.returncode == 0, done.stderr
        seen.add(tuple(json.loads(done.stdout)))
    assert seen == {tuple(partition_of(key) for key in KEYS)}
    assert all(0 <= p < partitions.DEFAULT_PARTITIONS for p in next(iter(seen)))


def test_keys_compare_by_serialized_form_and_equal_keys_pickle_alike():
    assert key_bytes(1) != key_bytes(1.0) and key_bytes(1) != key_bytes(True), "as in Hazelcast: 1, 1.0, True differ"
    shared = "x" * 20
    assert key_bytes((shared, shared)) == key_bytes(("x" * 20, "".join(["x"] * 20))), "no memo: sharing does not matter"
    assert key_bytes(("a", 1)) != key_bytes(("a", 2))


@pytest.mark.parametrize("key", [{1, 2}, frozenset({"a"}), {"a": 1}, (1, {2})])
def test_a_key_whose_pickle_depends_on_the_process_is_refused_saying_what_to_use(key):
    with pytest.raises(TypeError, match="sorted tuple"):
        partition_of(key)


def test_an_unpicklable_key_is_refused_clearly():
    with pytest.raises(TypeError, match="cannot be pickled"):
        partition_of((1, lambda: 0))


def test_keys_spread_over_the_partitions():
    counts = collections.Counter(partition_of(f"key-{i}") for i in range(27_100))
    assert len(counts) == 271
    assert max(counts.values()) < 3 * min(counts.values()), counts.most_common(3)


def members(count: int, hosts: int = 1) -> list[tuple[str, str]]:
    return [(f"m{i:02d}", f"host{i % hosts}") for i in range(count)]


def check(table: PartitionTable, data_members, backup_count: int) -> None:
    """What every table must be: full, distinct replicas, balanced owners and holders, hosts apart."""
    uuids = [uuid for uuid, _ in data_members]
    hosts = dict(data_members)
    width = min(backup_count + 1, len(uuids))
    assert len(table.replicas) == table.partitions
    for row in table.replicas:
        assert len(row) == width and len(set(row)) == width, row
        assert set(row) <= set(uuids)
        distinct_hosts = len(set(hosts.values()))
        assert len({hosts[uuid] for uuid in row}) == min(width, distinct_hosts), f"replicas share a host: {row}"
    held = collections.Counter(uuid for row in table.replicas for uuid in row)
    if len(set(hosts.values())) in (1, len(uuids)) or width == 1:  # hosts do not constrain the spread
        assert max(held[u] for u in uuids) - min(held[u] for u in uuids) <= 1, held


def test_a_first_table_is_balanced_and_versioned():
    table = plan(empty_table(), members(5))
    assert table.version == 1
    check(table, members(5), 1)
    owners = collections.Counter(row[0] for row in table.replicas)
    assert max(owners.values()) - min(owners.values()) <= 1
    assert plan(table, members(5)) is table, "nothing changed: the same table, the same version"


def test_replicas_land_on_distinct_hosts_where_there_are_several():
    data = members(6, hosts=3)
    table = plan(empty_table(backup_count=2), data)
    check(table, data, 2)
    hosts = dict(data)
    assert all(len({hosts[u] for u in row}) == 3 for row in table.replicas)


def test_a_dead_owners_partitions_are_owned_by_their_backup_which_has_the_data():
    before = plan(empty_table(), members(4))
    survivors = [m for m in members(4) if m[0] != "m01"]
    after = plan(before, survivors)
    assert after.version == before.version + 1
    for old, new in zip(before.replicas, after.replicas):
        if old[0] == "m01":
            assert new[0] == old[1], "the backup is promoted"
    lost = sum(row.count("m01") for row in before.replicas)
    moved = sum(len(set(new) - set(old)) for old, new in zip(before.replicas, after.replicas))
    assert lost <= moved <= lost + 3, f"{moved} replicas made for the {lost} lost: little else moves"
    check(after, survivors, 1)


def test_a_joiner_takes_its_share_with_little_movement_and_owns_once_it_has_the_data():
    before = plan(empty_table(), members(4))
    data = members(5)
    after = plan(before, data)
    moved = sum(len(set(new) - set(old)) for old, new in zip(before.replicas, after.replicas))
    share = 2 * 271 // 5
    assert share - 1 <= moved <= share + 2, f"{moved} replicas moved for a share of {share}"
    assert all(new[0] in old for old, new in zip(before.replicas, after.replicas)), \
        "a replica being migrated in does not own before it has the data"
    check(after, data, 1)
    settled = plan(after, data)  # the next table, once migration is done: owners even out too
    owners = collections.Counter(row[0] for row in settled.replicas)
    assert max(owners.values()) - min(owners.values()) <= 1, owners
    assert all(set(a) == set(b) for a, b in zip(after.replicas, settled.replicas)), "roles change, no data moves"


def test_no_members_no_replicas_and_bad_settings_are_refused():
    assert plan(empty_table(), []).replicas == ()
    with pytest.raises(ValueError, match="backup_count must be 0 to 6"):
        plan(empty_table(backup_count=MAX_BACKUPS + 1), members(2))
    table = plan(empty_table(), members(2))
    with pytest.raises(ValueError, match="cannot change"):
        plan(table, members(2), partitions=100)


def test_a_table_survives_the_wire_and_a_malformed_one_is_refused():
    table = plan(empty_table(partitions=7), members(3))
    assert PartitionTable.from_wire(json.loads(json.dumps(table.to_wire()))) == table
    with pytest.raises(ValueError, match="malformed"):
        PartitionTable.from_wire({"version": 1})
    with pytest.raises(ValueError, match="7 partitions with 1 rows"):
        PartitionTable.from_wire({**table.to_wire(), "replicas": [[0]]})
    with pytest.raises(ValueError, match="malformed"):
        PartitionTable.from_wire({**table.to_wire(), "replicas": [[9]] * 7})


@settings(max_examples=int(os.environ.get("GRID_HYPOTHESIS_EXAMPLES", "60")), deadline=None)
@given(steps=st.lists(st.tuples(st.booleans(), st.integers(0, 11)), min_size=1, max_size=12),
       backup_count=st.integers(0, 3), hosts=st.sampled_from([1, 2, 3, 12]), count=st.sampled_from([1, 13, 271]))
def test_any_sequence_of_joins_and_leaves_keeps_the_table_sound(steps, backup_count, hosts, count):
    universe = [(f"m{i:02d}", f"host{i % hosts}") for i in range(12)]
    present = [universe[0]]
    table = plan(empty_table(partitions=count, backup_count=backup_count), present)
    for joins, which in steps:
        candidate = universe[which]
        if joins and candidate not in present:
            present.append(candidate)
        elif not joins and candidate in present and len(present) > 1:
            present.remove(candidate)
        else:
            continue
        previous = table
        table = plan(previous, present)
        assert table.version == previous.version + 1 or table is previous
        alive = {uuid for uuid, _ in present}
        for old, new in zip(previous.replicas, table.replicas):
            survivors = [uuid for uuid in old if uuid in alive]
            if survivors and (len(new) > 1 or not joins):  # (a lone replica moves to a joiner by migration)
                assert new[0] in survivors, "a partition's data holder owns it: no acknowledged write is lost"
        table = plan(table, present)  # migration done
        check(table, present, backup_count)


def test_a_malformed_table_in_a_member_list_is_ignored_and_logged(caplog):
    assert partitions.received_table(None) is None, "a list from an older master carries none"
    with caplog.at_level("WARNING", logger="grid.membership"):
        assert partitions.received_table({"version": "one"}) is None
    assert "ignoring a partition table" in caplog.text
    table = plan(empty_table(partitions=5), members(2))
    assert partitions.received_table(table.to_wire()) == table


def test_a_join_keeps_the_replicas_it_drops_until_they_are_trimmed():
    """A join's table used to drop a holder at once ([A, B] -> [D, A], D still empty): kill A then,
    and the partition had no copy. The dropped holder now stays at the end of the row."""
    from grid.cluster.partitions import keep_holders, trimmed, width

    members = [("a", "h1"), ("b", "h2"), ("c", "h3")]
    before = plan(plan(empty_table(31, 1), members), members)
    joined = members + [("d", "h4")]
    planned = plan(plan(before, joined), joined)
    kept = keep_holders(planned, before, {uuid for uuid, _ in joined})
    moved = [p for p in range(31) if set(planned.replicas[p]) != set(before.replicas[p])]
    assert moved, "the joiner takes some replicas"
    for p in range(31):
        assert kept.replicas[p][:2] == planned.replicas[p], "the planned row first"
        assert set(kept.replicas[p]) == set(planned.replicas[p]) | set(before.replicas[p]), "every old holder kept"
    assert width(kept, 4) == 2 and any(len(row) > 2 for row in kept.replicas)
    settled = trimmed(kept, moved, 4)
    assert settled.version == kept.version + 1 and settled.replicas == planned.replicas
    gone = keep_holders(planned, before, {uuid for uuid, _ in joined if uuid != "b"})
    assert all("b" not in row[2:] for row in gone.replicas), "a holder that is gone is not kept"
