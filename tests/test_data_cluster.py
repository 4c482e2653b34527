"""The data structures on a real cluster: clients' ops reach the owners, writes survive kills and joins.

Each test runs sim members (processes on loopback) and clients in this process. What is
checked is what a user sees: another client reads what one wrote; every acknowledged write is
readable after a member is killed or one joins; a blocked queue ``get`` sleeps on the owner
and wakes when another client puts.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading

import pytest

import grid
from grid.cluster.partitions import partition_of
from grid.net import messaging

from .conftest import wait_for

WAIT = 30


def test_two_clients_share_a_map_a_counter_and_a_queue(local_cluster):
    cluster = local_cluster(3)
    first, second = cluster.connect(), cluster.connect()
    try:
        first.get_map("shared")["key"] = [1, 2]
        first.get_map("shared").update({n: str(n) for n in range(50)})
        assert second.get_map("shared")["key"] == [1, 2]
        assert len(second.get_map("shared")) == 51
        with pytest.raises(KeyError):
            second.get_map("shared")["absent"]

        def count(handle):
            counter = handle.get_counter("hits")
            for _ in range(25):
                counter.increment_and_get()

        threads = [threading.Thread(target=count, args=(handle,)) for handle in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert first.get_counter("hits").get() == 50

        first.get_queue("jobs").put("one")
        first.get_queue("jobs").put("two")
        jobs = second.get_queue("jobs")
        assert [jobs.get(timeout=WAIT), jobs.get(timeout=WAIT)] == ["one", "two"]
        with pytest.raises(queue.Empty):
            jobs.get_nowait()
    finally:
        first.close()
        second.close()


def test_a_name_is_one_kind_of_structure_and_objects_lists_them(local_cluster):
    cluster = local_cluster(2)
    first, second = cluster.connect(), cluster.connect()
    try:
        first.get_map("orders")["a"] = 1
        first.get_queue("work").put("job")
        first.get_counter("hits")
        first.get_list("steps").extend(["a", "b"])
        first.get_set("tags").update({"x", "y", "z"})
        first.get_multimap("owners").put("ann", 1)
        first.get_multimap("owners").put("ann", 2)
        with pytest.raises(TypeError, match="'orders' is a distributed map on this cluster, not a queue"):
            second.get_queue("orders")
        with pytest.raises(TypeError, match="get_list\\('steps'\\)"):
            second.get_set("steps")
        with pytest.raises(TypeError, match="'tags' is a distributed set on this cluster, not a list"):
            second.get_list("tags")
        with pytest.raises(TypeError, match="get_queue\\('work'\\)"):
            second.get_counter("work")
        with pytest.raises(ValueError, match="grid's own"):
            second.get_map("__grid.catalog")
        assert second.objects() == {"orders": {"kind": "map", "size": 1}, "work": {"kind": "queue", "size": 1},
                                    "hits": {"kind": "counter", "size": 1}, "steps": {"kind": "list", "size": 2},
                                    "tags": {"kind": "set", "size": 3}, "owners": {"kind": "multimap", "size": 2}}
        assert second.get_map("orders")["a"] == 1

        first.get_map("orders").destroy()
        first.get_queue("work").destroy()
        first.get_counter("hits").increment_and_get()
        first.get_counter("hits").destroy()
        first.get_list("steps").destroy()
        first.get_set("tags").destroy()
        first.get_multimap("owners").destroy()
        assert second.objects() == {}, "destroy() removes the structure and its name, cluster-wide"
        second.get_queue("orders").put("a queue now: the name is free again")
        assert second.get_counter("hits").get() == 0 and second.get_queue("work").qsize() == 0
        assert first.objects() == {"orders": {"kind": "queue", "size": 1}, "work": {"kind": "queue", "size": 0},
                                   "hits": {"kind": "counter", "size": 1}}
    finally:
        first.close()
        second.close()


def _fill(client, keys: int = 300):
    data = client.get_map("data")
    for key in range(keys):
        data[key] = key * key
    counter = client.get_counter("writes")
    for _ in range(20):
        counter.add_and_get(3)
    items = client.get_queue("items")
    for item in range(10):
        items.put(item)
    steps, seen = client.get_list("steps"), client.get_set("seen")
    for item in range(10):
        steps.insert(0, item)
        seen.add(item % 4)
    steps.sort()
    owners = client.get_multimap("owners")
    for item in range(30):
        owners.put(item % 7, item)


def _check(client, keys: int = 300):
    data = client.get_map("data")
    missing = [key for key in range(keys) if data.get(key) != key * key]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. keys {missing[:5]}"
    assert client.get_counter("writes").get() == 60
    assert client.get_queue("items").qsize() == 10
    assert client.get_list("steps") == list(range(10)) and client.get_set("seen") == {0, 1, 2, 3}
    owners = client.get_multimap("owners")
    assert len(owners) == 30 and all(owners.get(key) == list(range(key, 30, 7)) for key in range(7))


@pytest.mark.parametrize("victim", [0, 2], ids=["the master", "another member"])
def test_every_acknowledged_write_survives_a_killed_member(local_cluster, victim):
    cluster = local_cluster(3)
    client = cluster.connect()
    try:
        _fill(client)
        cluster.kill(victim)
        wait_for(lambda: len(client.members()) == 2, WAIT)
        _check(client)
        client.get_map("data")["after"] = "the kill"  # writes go on
        assert client.get_map("data")["after"] == "the kill"
    finally:
        client.close()


def test_a_joining_member_takes_partitions_with_their_data(local_cluster):
    """It used to take its partitions empty: a joiner's own older table named nobody who held them,
    so it asked nobody (92 of 300 keys were lost, and then their backups too)."""
    cluster = local_cluster(2)
    client = cluster.connect()
    try:
        _fill(client)
        before = {m.uuid for m in client.members()}
        cluster.add()
        wait_for(lambda: len(client.members()) == 3, WAIT)
        [joiner] = [m.uuid for m in client.members() if m.uuid not in before]
        wait_for(lambda: client.partitions().owned_by(joiner), WAIT)
        table = client.partitions()
        assert any(table.owner(partition_of(key, table.partitions)) == joiner for key in range(300))
        _check(client)
    finally:
        client.close()


def test_a_blocked_get_sleeps_on_the_owner_and_wakes_on_another_clients_put(local_cluster, monkeypatch):
    cluster = local_cluster(2)
    getter, putter = cluster.connect(), cluster.connect()
    asked = {"data.op": 0, "data.wait": 0}
    call = messaging.call

    def counting(conn, message_type, body, *args):
        if message_type in asked:
            asked[message_type] += 1
        return call(conn, message_type, body, *args)

    monkeypatch.setattr(messaging, "call", counting)
    got = []
    try:
        jobs = getter.get_queue("jobs")
        thread = threading.Thread(target=lambda: got.append(jobs.get(timeout=WAIT)))
        thread.start()
        put_jobs = putter.get_queue("jobs")
        wait_for(lambda: asked["data.wait"] >= 2, WAIT)  # its mark, then the wait parked on the owner
        polls = asked["data.op"]
        put_jobs.put("work")
        thread.join(WAIT)
        assert got == ["work"]
        assert asked["data.op"] - polls <= 2, "the put, and the get that found the item: no polling"
    finally:
        getter.close()
        putter.close()


def test_an_embedded_cluster_has_the_data_structures(tmp_path, monkeypatch):
    monkeypatch.delenv("GRID", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with grid.GridExecutor(max_workers=2) as executor:
        totals = executor.cluster.get_map("totals")
        totals.update({"a": 1, "b": 2})
        assert dict(totals) == {"a": 1, "b": 2}
        assert executor.cluster.get_counter("n").add_and_get(5) == 5


def test_a_member_handle_runs_the_ops_it_owns_itself_and_asks_for_the_rest(local_cluster):
    cluster = local_cluster(2)
    client = cluster.connect()
    try:
        with grid.connect(dict(cluster.config(), port=0), member=True) as own:
            me = own._peer.uuid
            wait_for(lambda: own.partitions().owned_by(me) and me in client.partitions().members(), WAIT)
            table = own.partitions()
            mine = [key for key in range(200) if table.owner(partition_of(key, table.partitions)) == me]
            assert mine and len(mine) < 200
            data = own.get_map("seen")
            data.update({key: -key for key in range(200)})
            assert [client.get_map("seen")[key] for key in range(200)] == [-key for key in range(200)]
            assert own.get_counter("c").add_and_get(2) == 2 and client.get_counter("c").get() == 2
    finally:
        client.close()


def test_is_safe_once_every_backup_holds_the_owners_writes_and_not_while_a_member_is_frozen(local_cluster):
    cluster = local_cluster(3)
    client = cluster.connect()
    try:
        _fill(client)
        wait_for(client.is_safe, WAIT)
        cluster.pause(2)  # its partitions' owner or backup answers nothing
        try:
            assert not client.is_safe(timeout=1)
        finally:
            cluster.resume(2)
        wait_for(client.is_safe, WAIT)
        cluster.kill(1)
        wait_for(lambda: len(client.members()) == 2 and client.is_safe(), WAIT)  # backed up again
        _check(client)
    finally:
        client.close()


def test_split_brain_protection_refuses_writes_on_the_smaller_side_and_they_go_on_after_heal(local_cluster):
    cluster = local_cluster(3, split_brain_protection=2, heartbeat_interval=0.2, failure_timeout=1.5)
    client = cluster.connect()
    lonely = grid.connect(cluster.config(2))  # a client of member 2 alone
    try:
        wait_for(lambda: cluster.peers[2].uuid in client.partitions().members(), WAIT)
        wait_for(client.is_safe, WAIT)  # every replica the table names holds its data
        table = client.partitions()
        # A key member 2 holds (it is alone on its side, and keeps only what it held).
        held = next(key for key in range(1000) if cluster.peers[2].uuid in table.replicas[partition_of(key, table.partitions)])
        client.get_map("guarded")[held] = 1
        cluster.partition([0, 1], [2])
        wait_for(lambda: len(lonely.members()) == 1 and len(client.members()) == 2, WAIT)
        wait_for(lambda: lonely.partitions().owned_by(lonely.members()[0].uuid) and
                 len(lonely.partitions().members()) == 1, WAIT)
        with pytest.raises(grid.SplitBrainProtection, match="split_brain_protection asks for at least 2"):
            lonely.get_map("guarded")["minority"] = 2
        assert lonely.get_map("guarded")[held] == 1, "reads still answer"
        client.get_map("guarded")["majority"] = 3  # two members: enough
        cluster.heal()
        wait_for(lambda: len(client.members()) == 3, WAIT)
        assert client.get_map("guarded")["majority"] == 3
    finally:
        lonely.close()
        client.close()


@pytest.mark.parametrize("fault", ["kill", "join", "pause"])
def test_no_acknowledged_write_is_lost_to_a_fault_in_the_middle_of_writing(local_cluster, fault):
    """A writer puts keys one after another (each put acknowledged, or failed with an error) while
    an owner is killed, a member joins, or an owner is frozen past failure_timeout: every
    acknowledged put is readable afterwards with its value."""
    timing = {"heartbeat_interval": 0.2, "failure_timeout": 1.5}
    cluster = local_cluster(3, **timing)
    client = cluster.connect()
    acknowledged, counted, errors = {}, [0], []
    stop = threading.Event()

    def write():
        data, counter = client.get_map("load"), client.get_counter("load-count")
        key = 0
        while not stop.is_set():
            try:
                data[key] = f"value-{key}"
                acknowledged[key] = f"value-{key}"
                counter.add_and_get(1)
                counted[0] += 1
            except Exception as exc:  # noqa: BLE001 - (DataUnavailable after 30 s: none expected)
                errors.append(exc)
                if not isinstance(exc, grid.GridError):
                    return  # a bug: the test fails on it below, at once
            key += 1

    writer = threading.Thread(target=write, name="test-writer")
    writer.start()
    try:
        wait_for(lambda: len(acknowledged) >= 200 or errors, WAIT)
        assert not errors, errors[:3]
        if fault == "kill":
            cluster.kill(1)
            wait_for(lambda: len(client.members()) == 2, WAIT)
        elif fault == "join":
            cluster.add(**timing)
            wait_for(lambda: len(client.members()) == 4, WAIT)
        else:
            cluster.pause(1)
            wait_for(lambda: len(client.members()) == 2, WAIT)
        written = len(acknowledged)
        wait_for(lambda: len(acknowledged) >= written + 200 or errors, WAIT)  # writes go on after the fault
        assert not errors, errors[:3]
        if fault == "pause":
            cluster.resume(1)  # it finds itself removed, and joins again
            wait_for(lambda: len(client.members()) == 3, WAIT)
    finally:
        stop.set()
        writer.join(WAIT + 10)
    try:
        assert not errors, errors[:3]
        data = client.get_map("load")
        lost = [key for key, value in acknowledged.items() if data.get(key) != value]
        assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged puts lost, e.g. {lost[:5]}"
        assert client.get_counter("load-count").get() == counted[0], "every acknowledged increment, once"
    finally:
        client.close()


def count_on_the_member(times: int):
    handle = grid.cluster()
    counter = handle.get_counter("from-tasks")
    for _ in range(times):
        counter.increment_and_get()
    return handle.is_member, handle.get_map("seen-by").setdefault(grid.current_member().uuid, "yes")


def test_in_a_task_grid_cluster_is_the_members_own_handle(tmp_path, monkeypatch):
    """It was a new client connection from the member to its own cluster (or, with nothing
    configured, another embedded cluster)."""
    monkeypatch.delenv("GRID", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with grid.GridExecutor(max_workers=2) as executor:
        outcomes = [future.result(WAIT) for future in [executor.submit(count_on_the_member, 5) for _ in range(4)]]
        assert all(is_member for is_member, _ in outcomes)
        assert executor.cluster.get_counter("from-tasks").get() == 20
        assert set(executor.cluster.get_map("seen-by").values()) == {"yes"}


def add_to_entry(entry, delta):
    entry.value = (entry.value or 0) + delta
    return entry.value


def test_processors_queries_and_aggregations_run_on_the_owners(local_cluster):
    cluster = local_cluster(2)
    client = cluster.connect()
    try:
        prices = client.get_map("prices")
        prices.update({n: {"price": n, "shop": "north" if n % 2 else "south"} for n in range(100)})
        table = client.partitions()
        owner = table.owner(client.partition_of(7))
        assert prices.execute_on_key(7, lambda entry: grid.current_member().uuid) == owner
        assert client.executor().submit_to_key_owner(7, lambda: grid.current_member().uuid).result(WAIT) == owner

        def raise_price(entry, by):
            entry.value = dict(entry.value, price=entry.value["price"] + by)
            return grid.current_member().uuid

        ran_on = prices.execute_on_entries(raise_price, 1000, predicate=lambda key, value: value["shop"] == "north")
        assert sorted(ran_on) == list(range(1, 100, 2))
        assert all(uuid == table.owner(client.partition_of(key)) for key, uuid in ran_on.items()), "each on its owner"
        assert prices[1]["price"] == 1001 and prices[2]["price"] == 2
        assert prices.select(lambda key, value: value["price"] > 1090) == {
            n: {"price": n + 1000, "shop": "north"} for n in range(91, 100, 2)}
        assert prices.aggregate(grid.aggregators.count()) == 100
        assert prices.aggregate(grid.aggregators.mean_of(lambda v: v["price"]), lambda key, value: value["shop"] == "south") \
            == sum(range(0, 100, 2)) / 50
        assert prices.aggregate(grid.aggregators.max_of(lambda v: v["price"])) == 1099
    finally:
        client.close()


def test_a_processor_applies_once_through_a_kill_of_its_owner(local_cluster):
    """Processors add 1 to one key while its owner is killed: a task on the dead member runs again
    at the new owner with the same call ids, so the key ends at the number of calls answered."""
    cluster = local_cluster(3, heartbeat_interval=0.2, failure_timeout=1.5)
    client = cluster.connect()
    answered, errors, stop = [0], [], threading.Event()
    hits = client.get_map("hits")

    def call():
        while not stop.is_set():
            try:
                hits.execute_on_key("key", add_to_entry, 1)
                answered[0] += 1
            except Exception as exc:  # noqa: BLE001 - the test fails on it below
                errors.append(exc)
                return

    caller = threading.Thread(target=call, name="test-processor-calls")
    caller.start()
    try:
        wait_for(lambda: answered[0] >= 30 or errors, WAIT)
        owner = client.partitions().owner(client.partition_of("key"))
        victim = next(index for index, peer in enumerate(cluster.peers) if peer.uuid == owner)
        cluster.kill(victim)
        wait_for(lambda: len(client.members()) == 2, WAIT)
        done = answered[0]
        wait_for(lambda: answered[0] >= done + 30 or errors, WAIT)
    finally:
        stop.set()
        caller.join(WAIT + 10)
    assert not errors, errors[:3]
    assert hits["key"] == answered[0]
    client.close()


def test_ttl_and_max_size_hold_on_a_cluster(local_cluster):
    cluster = local_cluster(2)
    client = cluster.connect()
    try:
        sessions = client.get_map("sessions", ttl=0.5)
        sessions["short"] = 1
        sessions.put("long", 2, ttl=600)
        wait_for(lambda: "short" not in sessions, WAIT)
        assert dict(sessions) == {"long": 2}
        # The owner's sweep removed it from the owner and the backup (it is not just hidden).
        wait_for(lambda: sum(size for _, name, size in _structure_sizes(client) if name == "sessions") == 2, WAIT)

        cache = client.get_map("cache", max_size=50)
        for key in range(500):
            cache[key] = key
        assert 40 <= len(cache) <= 52, "each owner keeps its share of 50"
        assert all(key in cache for key in range(480, 500)), "the least recently used went, not the newest"
    finally:
        client.close()


def _structure_sizes(client):
    """(member, name, size) of each map's part held on each member (owner and backup copies)."""
    sizes = []
    for uuid, state in client._data_backend().states(WAIT).items():
        sizes += [(uuid, name, size) for name, size in state.get("sizes", {}).items()]
    return sizes


def test_map_stats_say_what_each_member_holds_and_answered(local_cluster):
    cluster = local_cluster(2)
    client = cluster.connect()
    try:
        data = client.get_map("counted")
        data.update({n: "x" * 10 for n in range(100)})
        for n in range(30):
            data.get(n)
        data.get("absent")
        per_member = data.stats()["members"]
        assert set(per_member) == set(client.partitions().members())
        assert sum(s["entries"] for s in per_member.values()) == 100
        assert sum(s["backup_entries"] for s in per_member.values()) == 100, "backup_count = 1: one copy each"
        assert sum(s["hits"] for s in per_member.values()) == 30
        assert sum(s["operations"] for s in per_member.values()) >= 31
        assert all(s["bytes"] > 10 * s["entries"] for s in per_member.values())
    finally:
        client.close()


@pytest.mark.parametrize("policy", ["put_if_absent", "latest_update"])
def test_after_a_split_heals_the_smaller_sides_writes_merge_by_the_merge_policy(local_cluster, policy):
    """Without split_brain_protection both sides take writes. The smaller side used to drop all of
    it on the heal (it rejoined as if frozen); now its entries, queues, lists, sets and counters merge in."""
    cluster = local_cluster(3, merge_policy=policy, heartbeat_interval=0.2, failure_timeout=1.5)
    client = cluster.connect()
    lonely = grid.connect(cluster.config(2))
    try:
        wait_for(lambda: cluster.peers[2].uuid in client.partitions().members(), WAIT)
        client.get_map("split")["before"] = "both sides"
        wait_for(client.is_safe, WAIT)  # on both sides of the split to come
        cluster.partition([0, 1], [2])
        wait_for(lambda: len(lonely.members()) == 1 and len(client.members()) == 2, WAIT)
        wait_for(lambda: len(lonely.partitions().members()) == 1 and len(client.partitions().members()) == 2, WAIT)
        client.get_map("split")["contested"] = "majority"
        lonely.get_map("split")["contested"] = "minority, later"
        lonely.get_map("split").update({f"minority-{n}": n for n in range(50)})
        lonely.get_counter("minority-count").add_and_get(7)
        lonely.get_queue("minority-jobs").put("job")
        lonely.get_list("minority-list").extend([1, 2])
        client.get_set("both-sets").add("majority")
        lonely.get_set("both-sets").update({"minority", "majority"})
        lonely.get_multimap("minority-multimap").put("k", "v")
        lonely.get_lock("minority-lock").acquire()
        lonely.get_topic("minority-topic").publish("news")
        cluster.heal()
        wait_for(lambda: len(client.members()) == 3, WAIT)
        merged = client.get_map("split")
        wait_for(lambda: all(merged.get(f"minority-{n}") == n for n in range(50)), WAIT)
        expected = "majority" if policy == "put_if_absent" else "minority, later"
        wait_for(lambda: merged.get("contested") == expected, WAIT)
        assert merged["before"] == "both sides"
        wait_for(lambda: client.get_counter("minority-count").get() == 7, WAIT)
        assert client.get_queue("minority-jobs").get(timeout=WAIT) == "job"
        wait_for(lambda: client.get_list("minority-list") == [1, 2], WAIT)
        wait_for(lambda: client.get_set("both-sets") == {"majority", "minority"}, WAIT)  # (a set merges member by member)
        wait_for(lambda: client.get_multimap("minority-multimap").get("k") == ["v"], WAIT)
        from grid.data.counter import Counter  # (under the catalog: what the partitions hold by that name)

        backend = client._data_backend()
        assert Counter("minority-lock", backend).get() == 0 and Counter("minority-topic", backend).get() == 0, \
            "a lock's or topic's state was merged in as a counter"
    finally:
        lonely.close()
        client.close()


@pytest.mark.parametrize("received", ["nothing yet", "everything"])
def test_a_kill_while_a_joiner_still_receives_its_partitions_loses_nothing(local_cluster, received):
    """The table a join makes used to drop an old replica at once: a row [A, B] became [D, A]
    with D, the joiner, still empty. Here D is frozen as soon as the table names it, and A or B
    is killed: some partitions then had no holder left, and started empty.

    D stays a member while frozen (a long failure_timeout; the kill is noticed at once, by the
    refused connections, so the victim is not the master, whose death only the silence tells).
    It used to be removed as well: a second failure, which loses data whenever D got its
    partitions before the freeze and the master trimmed rows to [D, A] (under CPU load it often
    had). "everything" freezes D only once it holds its partitions, and the rows are trimmed."""
    timing = {"heartbeat_interval": 0.2, "failure_timeout": 10.0}
    cluster = local_cluster(3, **timing)
    client = cluster.connect()
    try:
        data, jobs = client.get_map("moving"), client.get_queue("moving-jobs")
        data.put_all({n: n for n in range(300)})
        for n in range(20):
            jobs.put(n)
        wait_for(client.is_safe, WAIT)
        joiner = cluster.add(**timing)
        wait_for(lambda: joiner.uuid in client.partitions().members(), WAIT)
        if received == "everything":
            wait_for(client.is_safe, WAIT)
        cluster.pause(joiner.index)  # in "nothing yet", mostly before it gets its data
        try:
            table, master = client.partitions(), client.members()[0].uuid
            victim = next(index for index, peer in enumerate(cluster.peers)
                          if peer.uuid not in (joiner.uuid, master) and peer.uuid in table.members())
            cluster.kill(victim)
            wait_for(lambda: cluster.peers[victim].uuid not in {m.uuid for m in client.members()}, WAIT)
            assert joiner.uuid in {m.uuid for m in client.members()}, "the frozen joiner was removed"
        finally:
            cluster.resume(joiner.index)
        lost = [n for n in range(300) if data.get(n) != n]
        assert not lost, f"{len(lost)} of 300 entries lost, e.g. {lost[:5]}"
        assert [jobs.get(timeout=WAIT) for _ in range(20)] == list(range(20))
    finally:
        client.close()


def _owner_index(cluster, client, name: str) -> int:
    """The peer index of the member that owns the partition of structure ``name``."""
    owner = client.partitions().owner(client.partition_of(name))
    return next(peer.index for peer in cluster.peers if peer.uuid == owner)


@pytest.mark.parametrize("fault", ["kill", "pause"])
def test_a_lock_stays_exclusive_through_a_kill_or_pause_of_its_owner_and_a_join(local_cluster, fault):
    """Four threads in two handles do a read-modify-write under the lock while the member holding the
    lock's partition is killed (or frozen past failure_timeout, then resumed: it rejoins) and another
    joins: no update is lost, and each holder's token is larger than the one before it (the lock's
    state failed over with its backup; the frozen ex-owner could acknowledge nothing)."""
    timing = {"heartbeat_interval": 0.2, "failure_timeout": 1.5}
    cluster = local_cluster(3, **timing)
    handles = [grid.connect(dict(cluster.config(), failure_timeout=5.0)) for _ in range(2)]  # (leases of 10 s)
    tokens, done, errors, stop = [], [0], [], threading.Event()

    def work(handle):
        lock, data = handle.get_lock("exclusive"), handle.get_map("guarded")
        while not stop.is_set():
            try:
                with lock as token:
                    tokens.append(token)
                    data.put("n", data.get("n", 0) + 1, fence=token)
                    done[0] += 1
            except Exception as exc:  # noqa: BLE001 - the test fails naming it
                errors.append(exc)
                return

    threads = [threading.Thread(target=work, args=(handle,)) for handle in handles for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: done[0] >= 20 or errors, WAIT)
        owner = _owner_index(cluster, handles[0], "exclusive")
        if fault == "kill":
            cluster.kill(owner)
            wait_for(lambda: len(handles[0].members()) == 2 or errors, WAIT)
        else:
            cluster.pause(owner)
            try:
                wait_for(lambda: len(handles[0].members()) == 2 or errors, WAIT)
            finally:
                cluster.resume(owner)
            wait_for(lambda: len(handles[0].members()) == 3 or errors, WAIT)  # (it rejoined)
        before = done[0]
        wait_for(lambda: done[0] >= before + 20 or errors, WAIT)
        cluster.add(**timing)
        wait_for(lambda: len(handles[0].members()) == (3 if fault == "kill" else 4) or errors, WAIT)
        before = done[0]
        wait_for(lambda: done[0] >= before + 20 or errors, WAIT)
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT)
    try:
        assert not errors, errors
        assert handles[0].get_map("guarded")["n"] == done[0], "two holders at once: an update was lost"
        assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
        assert not handles[1].get_lock("exclusive").locked()
    finally:
        for handle in handles:
            handle.close()


HOLDER = r"""
import json, sys, grid
from grid.data.store import StaleToken
from grid.data.sync import LockLost
with grid.connect(json.loads(sys.argv[1])) as cluster:
    lock, data = cluster.get_lock("fenced"), cluster.get_map("fenced-data")
    token = lock.acquire()
    data.put("x", "first holder", fence=token)
    print("holding", int(token), flush=True)
    sys.stdin.readline()  # (frozen here by the test, then resumed)
    try:
        data.put("x", "stale", fence=token)
        print("written", flush=True)
    except StaleToken:
        print("refused", flush=True)
    try:
        lock.release()
        print("released", flush=True)
    except LockLost:
        print("lost", flush=True)
"""


def test_a_paused_holder_loses_the_lock_and_its_token_is_refused(local_cluster):
    """The holder is SIGSTOPped past its lease: another takes the lock with a larger token and writes;
    the resumed ex-holder's fenced write is refused and its release says the lock was lost."""
    cluster = local_cluster(2, heartbeat_interval=0.2, failure_timeout=1.5)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, json.dumps(cluster.config())], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    client = cluster.connect()
    try:
        first = holder.stdout.readline().split()
        assert first[0] == "holding", first
        lock = client.get_lock("fenced")
        assert lock.acquire(blocking=False) is False
        os.kill(holder.pid, signal.SIGSTOP)
        try:
            token = lock.acquire(timeout=WAIT)  # once the frozen holder's lease ran out (2 x 1.5 s)
            assert token > int(first[1])
            client.get_map("fenced-data").put("x", "second holder", fence=token)
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert [holder.stdout.readline().strip() for _ in range(2)] == ["refused", "lost"]
        assert client.get_map("fenced-data")["x"] == "second holder"
        lock.release()
    finally:
        holder.kill()
        holder.wait(WAIT)
        client.close()


def test_a_dead_holders_lock_and_permits_come_back(local_cluster):
    cluster = local_cluster(2, heartbeat_interval=0.2, failure_timeout=1.5)
    script = ("import json, sys, grid\nc = grid.connect(json.loads(sys.argv[1]))\nc.get_lock('dead').acquire()\n"
              "c.get_semaphore('dead-permits', 2).acquire(n=2)\nprint('holding', flush=True)\nsys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", script, json.dumps(cluster.config())], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    client = cluster.connect()
    try:
        assert holder.stdout.readline().strip() == "holding"
        semaphore = client.get_semaphore("dead-permits")
        assert semaphore.available() == 0 and client.get_lock("dead").locked()
        holder.kill()  # (no close: the process is gone, its leases stop)
        holder.wait(WAIT)
        assert client.get_lock("dead").acquire(timeout=WAIT)
        assert semaphore.acquire(timeout=WAIT, n=2)
    finally:
        holder.kill()
        holder.wait(WAIT)
        client.close()


def subscribe_on_the_member(name: str, count: int) -> list:
    """(A task) subscribe through the member's own handle until ``count`` messages came; them."""
    got, enough = [], threading.Event()

    def keep(message):
        got.append(message)
        if len(got) >= count:
            enough.set()

    subscription = grid.cluster().get_topic(name, reliable=True).subscribe(keep, start=0)
    try:
        enough.wait(60)
        return list(got)
    finally:
        subscription.cancel()


def test_a_topics_subscribers_on_clients_and_members_get_each_message_once_in_order_through_a_kill(local_cluster):
    timing = {"heartbeat_interval": 0.2, "failure_timeout": 1.5}
    cluster = local_cluster(3, **timing)
    subscriber, publishers = cluster.connect(), [cluster.connect() for _ in range(2)]
    got = []
    topic = subscriber.get_topic("events", reliable=True)
    subscription = topic.subscribe(got.append)
    on_member = subscriber.executor().submit(subscribe_on_the_member, "events", 200)
    try:
        victim = _owner_index(cluster, subscriber, "events")
        if victim == 0:  # (the member the client came in by stays)
            victim = 1
        def publish(n):
            mine = publishers[n].get_topic("events", reliable=True)
            for i in range(100):
                mine.publish((n, i))
                if n == 0 and i == 50:
                    cluster.kill(victim)

        threads = [threading.Thread(target=publish, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 3)
        wait_for(lambda: len(got) >= 200, WAIT)
        member_got = on_member.result(WAIT * 3)
        for received in (got, member_got):
            assert len(received) == 200, "each message once"
            for n in range(2):
                assert [i for who, i in received if who == n] == list(range(100)), "in each publisher's order"
        assert got == member_got, "one order for every subscriber"
    finally:
        subscription.cancel()
        for handle in (subscriber, *publishers):
            handle.close()


def test_a_lock_on_the_smaller_side_of_a_split_is_refused_with_split_brain_protection(local_cluster):
    cluster = local_cluster(3, split_brain_protection=2, heartbeat_interval=0.2, failure_timeout=1.5)
    client = cluster.connect()
    lonely = grid.connect(cluster.config(2))  # a client of member 2 alone
    try:
        wait_for(lambda: cluster.peers[2].uuid in client.partitions().members(), WAIT)
        wait_for(client.is_safe, WAIT)
        held = client.get_lock("split-lock")
        token = held.acquire()
        cluster.partition([0, 1], [2])
        wait_for(lambda: len(lonely.members()) == 1 and len(client.members()) == 2, WAIT)
        wait_for(lambda: len(lonely.partitions().members()) == 1, WAIT)
        with pytest.raises(grid.SplitBrainProtection):
            lonely.get_lock("split-lock").acquire(timeout=WAIT)
        assert held.locked()
        cluster.heal()
        wait_for(lambda: len(client.members()) == 3, WAIT)
        held.release()
        assert lonely.get_lock("split-lock").acquire(timeout=WAIT) > token
    finally:
        lonely.close()
        client.close()
