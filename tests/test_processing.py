"""Entry processors, queries and aggregations over a DMap, in one process (``LocalBackend``)."""

from __future__ import annotations

import threading

import pytest

import grid.aggregators as agg
from grid.data import processing
from grid.data.dmap import DMap
from grid.data.store import LocalBackend


def new_map(entries=None) -> DMap:
    dmap = DMap("m", LocalBackend(7))
    dmap.update(entries or {})
    return dmap


def add(entry, delta):
    entry.value = (entry.value or 0) + delta
    return entry.value


def test_a_processor_sees_the_entry_sets_or_deletes_it_and_returns_its_result():
    dmap = new_map({"a": 1})
    seen = []
    assert dmap.execute_on_key("a", lambda entry: seen.append((entry.key, entry.value, entry.exists))) is None
    assert seen == [("a", 1, True)]
    assert dmap.execute_on_key("a", add, 4) == 5 and dmap["a"] == 5
    assert dmap.execute_on_key("new", add, 1) == 1 and dmap["new"] == 1, "an absent entry can be made"

    def remove(entry):
        del entry.value
        return entry.exists

    assert dmap.execute_on_key("a", remove) is False and "a" not in dmap
    assert dmap.execute_on_key("never", remove) is False and "never" not in dmap
    assert repr(processing.Entry("k")) == "Entry('k', absent)"


def test_a_processor_is_atomic_for_its_key_under_contention():
    """Four threads add 1 a hundred times each through processors: no increment is lost
    (a read-modify-write without the check would lose some)."""
    dmap = new_map({"hits": 0})
    threads = [threading.Thread(target=lambda: [dmap.execute_on_key("hits", add, 1) for _ in range(100)])
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert dmap["hits"] == 400


def test_a_processor_task_run_again_replays_its_calls_and_applies_nothing_twice():
    """A task on an owner that died may run again at the new owner, with the same call ids."""
    dmap = new_map({"k": 10})
    assert processing.run_on_key(dmap, "k", add, (1,), "call-1") == 11
    processing.run_on_key(dmap, "k", add, (1,), "call-1")  # the same call, again
    assert dmap["k"] == 11
    processing.run_on_key(dmap, "k", add, (1,), "call-2")
    assert dmap["k"] == 12


def test_execute_on_entries_runs_on_the_entries_the_predicate_picks():
    dmap = new_map({n: n for n in range(20)})
    results = dmap.execute_on_entries(add, 100, predicate=lambda key, value: key % 2 == 0)
    assert results == {n: n + 100 for n in range(0, 20, 2)}
    assert dict(dmap) == {n: n + 100 if n % 2 == 0 else n for n in range(20)}
    before = dict(dmap)
    assert dmap.execute_on_entries(add, 1) == {n: value + 1 for n, value in before.items()}, "no predicate: all"


def test_select_returns_the_matching_entries():
    dmap = new_map({n: {"n": n, "even": n % 2 == 0} for n in range(30)})
    assert dmap.select(lambda key, value: value["even"] and key > 20) == {n: {"n": n, "even": True}
                                                                         for n in (22, 24, 26, 28)}
    assert dmap.select(lambda key, value: False) == {}
    with pytest.raises(TypeError, match="predicate"):
        dmap.select("n > 3")
    with pytest.raises(TypeError, match="dict\\(map\\)"):
        dmap.select(None)


def test_the_aggregators_fold_like_the_builtins_and_answer_for_no_entries():
    values = {n: n * 3 % 17 for n in range(40)}
    dmap = new_map(values)
    assert dmap.aggregate(agg.count()) == 40
    assert dmap.aggregate(agg.sum_of()) == sum(values.values())
    assert dmap.aggregate(agg.min_of()) == min(values.values())
    assert dmap.aggregate(agg.max_of(lambda v: -v)) == max(-v for v in values.values())
    assert dmap.aggregate(agg.mean_of(), lambda key, value: key < 10) == sum(values[n] for n in range(10)) / 10
    assert dmap.aggregate(agg.distinct(lambda v: v % 4)) == {v % 4 for v in values.values()}
    keys = dmap.aggregate((lambda key, value: [key], lambda a, b: a + b), lambda key, value: value == 0)
    assert sorted(keys) == [0, 17, 34]
    nothing = lambda key, value: False  # noqa: E731
    assert [dmap.aggregate(a, nothing) for a in (agg.count(), agg.sum_of(), agg.min_of(), agg.mean_of(), agg.distinct())] \
        == [0, 0, None, None, set()]


def test_bad_processors_predicates_and_aggregators_say_what_to_pass():
    dmap = new_map({"a": 1})
    with pytest.raises(TypeError, match="takes a function"):
        dmap.execute_on_key("a", 42)
    with pytest.raises(TypeError, match="unhashable"):
        dmap.execute_on_key(["a"], add, 1)
    with pytest.raises(TypeError, match="Aggregator"):
        dmap.aggregate("count")
    with pytest.raises(TypeError, match="takes callables"):
        agg.Aggregator(1, 2)
    with pytest.raises(TypeError, match="callable taking the value"):
        agg.sum_of("price")
    with pytest.raises(ZeroDivisionError):  # what the processor raises reaches the caller as it is
        dmap.execute_on_key("a", lambda entry: 1 / 0)
    assert dmap["a"] == 1
