"""A map's ttl, max_idle and max_size: entries whose time is up read as absent and are removed by
their owner; a map over its size drops its least recently used entries. A fake clock drives time."""

from __future__ import annotations

import pytest

from grid.data.dmap import DMap
from grid.data.node import DataNode
from grid.data.store import MAP, LocalBackend, Op, Replica

from .test_data_node import PARTITIONS, Net, table


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def timed_map(clock, **limits) -> DMap:
    return DMap("m", LocalBackend(7, clock=clock), **limits)


def test_an_entry_lives_for_its_ttl_and_then_reads_as_absent_everywhere():
    clock = Clock()
    dmap = timed_map(clock, ttl=10)
    dmap["short"] = 1
    dmap.put("long", 2, ttl=100)  # its own ttl instead of the map's
    clock.now += 9.9
    assert dict(dmap) == {"short": 1, "long": 2}
    clock.now += 0.2
    assert "short" not in dmap and dmap.get("short") is None and len(dmap) == 1
    assert dmap.get_all(["short", "long"]) == {"long": 2} and list(dmap) == ["long"]
    assert dmap.put_if_absent("short", 3) is None, "an expired entry is absent to writes too"
    assert dmap["short"] == 3
    with pytest.raises(KeyError):
        clock.now += 10
        del dmap["short"]


def test_a_write_without_a_ttl_drops_the_old_one():
    clock = Clock()
    dmap = timed_map(clock)
    dmap.put("k", 1, ttl=5)
    dmap["k"] = 2  # the map has no ttl: from now on the entry lives on
    clock.now += 50
    assert dmap["k"] == 2


def test_max_idle_keeps_the_entries_that_are_used():
    clock = Clock()
    dmap = timed_map(clock, max_idle=10)
    dmap.update({"used": 1, "idle": 2})
    for _ in range(5):
        clock.now += 6
        assert dmap["used"] == 1  # each read starts its idle time again
    assert "idle" not in dmap and dict(dmap) == {"used": 1}


def test_the_owner_sweeps_expired_entries_as_backed_up_writes():
    replica = Replica(0, clock := Clock())
    replica.execute(Op(MAP, "m", "set", (b"k", b"v"), "c1", 0, (5, None, None)))
    clock.now += 6
    due = replica.due()
    assert due == {"m": [b"k"]}
    outcome = replica.execute(Op(MAP, "m", "expire", (due["m"],)))
    assert outcome.record.effects == (("map", "m", "expire", (b"k",)),), "the backups apply it, as 'expire'"
    assert replica.structures() == [] and replica.due() == {}


def test_a_promoted_backup_expires_an_entry_when_its_owner_would_have():
    """The write's times are in its record: a backup made owner knows when the entry's ttl ends."""
    net = Net("a", "b")
    net.start(table(1, ("a", "b")))
    token = net.op("a", 0, Op(MAP, "m", "set", (b"k", b"v"), "w", 1, (30, None, None)))
    net.deliver()
    net.result(token)
    deadline = net.nodes["b"].replicas[0]._meta["m"][b"k"][0]
    assert deadline == net.nodes["a"].replicas[0]._meta["m"][b"k"][0]
    del net.nodes["a"]
    net.table(table(2, ("b",)))
    replica = net.nodes["b"].replicas[0]
    replica._clock = lambda: deadline - 1
    assert net.read("b", 0, Op(MAP, "m", "get", (b"k",), None, 2)) == b"v"
    replica._clock = lambda: deadline
    assert net.read("b", 0, Op(MAP, "m", "get", (b"k",), None, 2)) is None
    net.take("b", net.nodes["b"].tick(100.0))  # the sweep
    assert replica.structures() == []


def test_a_map_over_its_max_size_drops_the_least_recently_used():
    clock = Clock()
    dmap = timed_map(clock, max_size=7)
    for key in range(7):
        clock.now += 1
        dmap[key] = key
    clock.now += 1
    assert dmap[0] == 0  # used: 1 is the least recently used now
    clock.now += 1
    dmap[100] = 100
    assert set(dmap) == {0, 2, 3, 4, 5, 6, 100}
    clock.now += 1
    dmap.update({200: 200, 201: 201})
    assert set(dmap) == {0, 4, 5, 6, 100, 200, 201}


def test_max_size_is_kept_per_owner_share_in_the_node():
    """Each owner keeps max_size times its part of the partitions (here: a owns them all)."""
    node = DataNode("a", PARTITIONS)
    node.take_table(table(1, ("a",)))
    for number in range(20):
        key = f"k{number}".encode()
        node.on_op(number, number % PARTITIONS, Op(MAP, "m", "set", (key, b"v"), f"c{number}", 1, (None, None, 6)))
    assert sum(replica.map_size("m") for replica in node.replicas.values()) == 6
    held = {key for replica in node.replicas.values() for key in replica._structures.get((MAP, "m"), {})}
    assert held == {f"k{number}".encode() for number in range(14, 20)}, "the six written last"


def test_limits_that_are_not_positive_numbers_are_refused():
    backend = LocalBackend(7)
    for limits in ({"ttl": 0}, {"max_idle": -1}, {"ttl": "5"}, {"max_size": 0}, {"max_size": 2.5}, {"ttl": True}):
        with pytest.raises(ValueError, match="or None"):
            DMap("m", backend, **limits)
    with pytest.raises(ValueError, match="ttl"):
        DMap("m", backend).put("k", 1, ttl=-3)
