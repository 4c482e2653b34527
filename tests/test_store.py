"""Partition replicas (grid.data.store): owner and backups against dict, deque and int models."""

from __future__ import annotations

import collections
import os

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from grid.data import store
from grid.data.store import COUNTER, MAP, QUEUE, Fenced, Op, OutOfOrder, Replica, StoreError

EXAMPLES = int(os.environ.get("GRID_HYPOTHESIS_EXAMPLES", "80"))

keys = st.sampled_from([b"k1", b"k2", b"k3"])
values = st.sampled_from([b"a", b"b", b"c"])
map_ops = st.one_of(
    st.tuples(st.just("put"), keys, values), st.tuples(st.just("set"), keys, values),
    st.tuples(st.just("put_if_absent"), keys, values), st.tuples(st.just("replace"), keys, values),
    st.tuples(st.just("replace_if_same"), keys, values, values), st.tuples(st.just("remove"), keys),
    st.tuples(st.just("remove_if_same"), keys, values), st.tuples(st.just("delete"), keys),
    st.tuples(st.just("get"), keys), st.tuples(st.just("contains"), keys), st.tuples(st.just("size")),
    st.tuples(st.just("clear")), st.tuples(st.just("put_all"), st.lists(st.tuples(keys, values), max_size=3)),
    st.tuples(st.just("get_all"), st.lists(keys, max_size=3)))
queue_ops = st.one_of(
    st.tuples(st.just("offer"), values, st.integers(0, 3)), st.tuples(st.just("poll"), st.integers(1, 3)),
    st.tuples(st.just("offer_all"), st.lists(values, max_size=4), st.integers(0, 3)),
    st.tuples(st.just("size")), st.tuples(st.just("peek")), st.tuples(st.just("task_done")),
    st.tuples(st.just("clear")), st.tuples(st.just("unfinished")))
counter_ops = st.one_of(
    st.tuples(st.just("get")), st.tuples(st.just("set"), st.integers(-5, 5)),
    st.tuples(st.just("add_and_get"), st.integers(-5, 5)), st.tuples(st.just("get_and_add"), st.integers(-5, 5)),
    st.tuples(st.just("compare_and_set"), st.integers(-2, 2), st.integers(-5, 5)))
ops = st.one_of(st.tuples(st.just(MAP), map_ops), st.tuples(st.just(QUEUE), queue_ops),
                st.tuples(st.just(COUNTER), counter_ops))


class Model:
    """What each operation must answer: a dict, a deque with an unfinished count, an int."""

    def __init__(self):
        self.map: dict = {}
        self.queue: collections.deque = collections.deque()
        self.unfinished = 0
        self.counter = 0

    def run(self, kind, action, *args):
        if kind == MAP:
            entries = self.map
            if action in ("put", "set"):
                old = entries.get(args[0])
                entries[args[0]] = args[1]
                return old if action == "put" else None
            if action == "put_if_absent":
                old = entries.get(args[0])
                if old is None:
                    entries[args[0]] = args[1]
                return old
            if action == "replace":
                old = entries.get(args[0])
                if old is not None:
                    entries[args[0]] = args[1]
                return old
            if action == "replace_if_same":
                if entries.get(args[0]) == args[1]:
                    entries[args[0]] = args[2]
                    return True
                return False
            if action == "remove":
                return entries.pop(args[0], None)
            if action == "remove_if_same":
                if args[0] in entries and entries[args[0]] == args[1]:
                    del entries[args[0]]
                    return True
                return False
            if action == "delete":
                return entries.pop(args[0], None) is not None
            if action == "get":
                return entries.get(args[0])
            if action == "contains":
                return args[0] in entries
            if action == "size":
                return len(entries)
            if action == "clear":
                count = len(entries)
                entries.clear()
                return count
            if action == "put_all":
                entries.update(args[0])
                return None
            return {key: entries[key] for key in args[0] if key in entries}
        if kind == QUEUE:
            if action == "offer":
                if 0 < args[1] <= len(self.queue):
                    return False
                self.queue.append(args[0])
                self.unfinished += 1
                return True
            if action == "offer_all":
                room = len(args[0]) if args[1] <= 0 else max(0, args[1] - len(self.queue))
                taken = args[0][:room]
                self.queue.extend(taken)
                self.unfinished += len(taken)
                return len(taken)
            if action == "poll":
                return [self.queue.popleft() for _ in range(min(args[0], len(self.queue)))]
            if action == "size":
                return len(self.queue)
            if action == "peek":
                return self.queue[0] if self.queue else None
            if action == "unfinished":
                return self.unfinished
            if action == "clear":  # cleared items will never be done: join stops waiting for them
                count = len(self.queue)
                self.queue.clear()
                self.unfinished = max(0, self.unfinished - count)
                return count
            if self.unfinished <= 0:  # task_done
                raise StoreError("task_done() called too many times")
            self.unfinished -= 1
            return None
        if action == "get":
            return self.counter
        if action == "set":
            self.counter = args[0]
            return None
        if action == "add_and_get":
            self.counter += args[0]
            return self.counter
        if action == "get_and_add":
            self.counter += args[0]
            return self.counter - args[0]
        if self.counter == args[0]:  # compare_and_set
            self.counter = args[1]
            return True
        return False


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(ops, max_size=40))
@example([(QUEUE, ("offer", b"a", 0)), (QUEUE, ("offer", b"b", 0)), (QUEUE, ("poll", 1)), (QUEUE, ("clear",))])
def test_an_owner_answers_as_the_models_do_and_its_backup_ends_identical(sequence):
    owner, backup, model = Replica(7), Replica(7), Model()
    for number, (kind, (action, *args)) in enumerate(sequence):
        op = Op(kind, "s", action, tuple(args), call_id=f"call-{number}")
        try:
            expected = model.run(kind, action, *args)
        except StoreError:
            with pytest.raises(StoreError, match="too many times"):
                owner.execute(op)
            continue
        outcome = owner.execute(op)
        assert outcome.result == expected, (kind, action, args)
        if outcome.record is not None:
            backup.replicate(outcome.record)
    assert backup.snapshot() == owner.snapshot(), "the backup holds exactly what the owner does"
    assert owner.execute(Op(MAP, "s", "entries")).result == list(model.map.items())
    assert [owner.execute(Op(QUEUE, "s", action)).result for action in ("size", "unfinished")] == \
        [len(model.queue), model.unfinished]
    assert owner.execute(Op(QUEUE, "s", "poll", (99,))).result == list(model.queue)
    assert owner.execute(Op(COUNTER, "s", "get")).result == model.counter


def test_a_retried_call_applies_once_on_the_owner_and_on_a_backup_promoted_since():
    owner, backup = Replica(1), Replica(1)
    first = owner.execute(Op(COUNTER, "hits", "add_and_get", (5,), call_id="c1"))
    backup.replicate(first.record)
    again = owner.execute(Op(COUNTER, "hits", "add_and_get", (5,), call_id="c1"))
    assert (first.result, again.result, again.record) == (5, 5, None)
    # The owner dies after its backup applied the record but before the caller heard: the retry
    # reaches the promoted backup, which answers from the call id the record carried.
    promoted = backup.execute(Op(COUNTER, "hits", "add_and_get", (5,), call_id="c1"))
    assert promoted.result == 5 and promoted.record is None
    assert backup.execute(Op(COUNTER, "hits", "get")).result == 5
    item = backup.execute(Op(QUEUE, "jobs", "offer", (b"x", 0), call_id="q1"))
    assert backup.execute(Op(QUEUE, "jobs", "poll", (1,), call_id="q2")).result == [b"x"]
    assert backup.execute(Op(QUEUE, "jobs", "poll", (1,), call_id="q2")).result == [b"x"], "no item got twice"
    assert item.result is True and backup.execute(Op(QUEUE, "jobs", "size")).result == 0


def test_an_ex_owner_of_an_older_table_is_fenced_by_its_backup_and_by_its_own_replica():
    owner, backup = Replica(3), Replica(3)
    stale = owner.execute(Op(MAP, "m", "put", (b"k", b"old"), call_id="a", table_version=4))
    backup.follow(5)  # the master moved the partition away; the paused owner has not heard
    with pytest.raises(Fenced, match="no longer owns it"):
        backup.replicate(stale.record)
    owner.follow(5)
    with pytest.raises(Fenced, match="table version 4"):
        owner.execute(Op(MAP, "m", "put", (b"k", b"new"), call_id="b", table_version=4))
    assert owner.execute(Op(MAP, "m", "get", (b"k",), table_version=5)).result == b"old"


def test_a_backup_that_missed_records_says_which_it_needs():
    owner, backup = Replica(2), Replica(2)
    records = [owner.execute(Op(MAP, "m", "set", (b"k%d" % i, b"v"), call_id=str(i))).record for i in range(3)]
    backup.replicate(records[0])
    with pytest.raises(OutOfOrder) as missed:
        backup.replicate(records[2])
    assert missed.value.expected == 2
    backup.replicate(records[0])  # a duplicate is harmless
    backup.replicate(records[1])
    backup.replicate(records[2])
    assert backup.snapshot() == owner.snapshot()


def test_migration_is_a_snapshot_then_the_records_made_meanwhile():
    owner = Replica(9)
    for i in range(5):
        owner.execute(Op(MAP, "m", "set", (b"%d" % i, b"v"), call_id=f"m{i}"))
    owner.execute(Op(QUEUE, "q", "offer_all", ((b"a", b"b"), 0), call_id="q"))
    snapshot = owner.snapshot()
    during = [owner.execute(Op(MAP, "m", "delete", (b"1",), call_id="d")).record,
              owner.execute(Op(COUNTER, "c", "add_and_get", (2,), call_id="c")).record]
    joiner = Replica.restore(snapshot)
    for record in during:
        joiner.replicate(record)
    joiner.replicate(during[0])  # sent twice (before and after the snapshot was taken): applied once
    assert joiner.snapshot() == owner.snapshot()
    assert sorted(joiner.structures()) == [(COUNTER, "c", 1), (MAP, "m", 4), (QUEUE, "q", 2)]


def test_bad_operations_are_refused_saying_what_exists():
    replica = Replica(0)
    with pytest.raises(StoreError, match="a map has no operation 'push'.*contains"):
        replica.execute(Op(MAP, "m", "push", ()))
    with pytest.raises(StoreError, match="unknown structure kind 'tree'"):
        replica.execute(Op("tree", "t", "get", ()))
    assert replica.execute(Op(MAP, "m", "get", (b"absent",))).result is None
    assert replica.seq == 0, "reads and refused ops make no records"
    assert replica.destroy(MAP, "m") is False
    replica.execute(Op(MAP, "m", "set", (b"k", b"v")))
    assert replica.destroy(MAP, "m") is True and replica.structures() == []
    assert store.KINDS == (MAP, QUEUE, COUNTER, store.LIST, store.SET, store.MULTIMAP, store.LOCK, store.SEMAPHORE,
                           store.TOPIC)


def test_a_merge_sets_an_absent_entry_or_with_latest_update_a_later_one():
    from grid.data.store import COUNTER, MAP, QUEUE, Op, Replica

    replica = Replica(0, clock=lambda: 100.0)
    replica.keep_times = True
    replica.execute(Op(MAP, "m", "set", (b"k", b"here"), "c1"))
    assert replica.written_at("m", b"k") == 100.0

    def merge(key, value, at, policy):
        return replica.execute(Op(MAP, "m", "merge", (key, value, at, policy), None)).result

    assert merge(b"k", b"theirs", 200.0, "put_if_absent") is False, "present: put_if_absent keeps it"
    assert merge(b"k", b"older", 50.0, "latest_update") is False, "written before this side's"
    assert merge(b"k", b"newer", 200.0, "latest_update") is True
    assert replica.execute(Op(MAP, "m", "get", (b"k",))).result == b"newer" and replica.written_at("m", b"k") == 200.0
    assert merge(b"new", b"v", None, "put_if_absent") is True
    assert replica.execute(Op(MAP, "m", "get", (b"new",))).result == b"v"
    # A queue or a counter merges only where this side has none.
    assert replica.execute(Op(QUEUE, "q", "merge", ((b"a",),), None)).result is True
    assert replica.execute(Op(QUEUE, "q", "merge", ((b"b",),), None)).result is False
    assert replica.execute(Op(COUNTER, "c", "merge", (5,), None)).result is True
    assert replica.execute(Op(COUNTER, "c", "merge", (9,), None)).result is False
    assert replica.execute(Op(COUNTER, "c", "get")).result == 5
