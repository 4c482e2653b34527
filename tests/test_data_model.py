"""Model-based: a DMap, a DQueue and a Counter, and a DList and a DSet, on a sim cluster against
dict, deque, int, list and set, while Hypothesis interleaves their operations with member kills,
joins and freezes past failure_timeout.

Each acknowledged operation answers as its model does, and at the end every structure equals its
model: no acknowledged write lost, none applied twice, no queue item got twice.
"""

from __future__ import annotations

import collections
import queue

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from sim import LocalCluster

from .conftest import wait_for

WAIT = 30
TIMING = {"heartbeat_interval": 0.2, "failure_timeout": 1.5}
KEYS = st.integers(0, 15)


class ThroughFaults(RuleBasedStateMachine):
    """Three members, and the faults; a subclass adds the structures and their rules."""

    def __init__(self):
        super().__init__()
        self.cluster = LocalCluster(3, **TIMING)
        self.client = self.cluster.connect()
        self.alive = [0, 1, 2]  # peer indexes running

    @initialize()
    def started(self):
        wait_for(lambda: len(self.client.partitions().members()) == 3, WAIT)

    # -- the faults ------------------------------------------------------------------------------

    @precondition(lambda self: len(self.alive) >= 3)
    @rule(which=st.integers(0, 2))
    def kill_and_replace(self, which):
        victim = self.alive.pop(which % len(self.alive))
        self.cluster.kill(victim)
        wait_for(lambda: len(self.client.members()) == len(self.alive), WAIT)
        self._backed_up_again()
        self.alive.append(self.cluster.add(**TIMING).index)
        wait_for(lambda: len(self.client.members()) == len(self.alive), WAIT)
        self._backed_up_again()

    @precondition(lambda self: len(self.alive) < 4)
    @rule()
    def join(self):
        self.alive.append(self.cluster.add(**TIMING).index)
        wait_for(lambda: len(self.client.members()) == len(self.alive), WAIT)
        self._backed_up_again()

    @precondition(lambda self: len(self.alive) >= 3)
    @rule(which=st.integers(0, 3))
    def freeze_past_failure_timeout(self, which):
        frozen = self.alive[which % len(self.alive)]
        self.cluster.pause(frozen)
        try:
            wait_for(lambda: len(self.client.members()) == len(self.alive) - 1, WAIT)
        finally:
            self.cluster.resume(frozen)
        wait_for(lambda: len(self.client.members()) == len(self.alive), WAIT)  # it rejoined
        self._backed_up_again()

    def _backed_up_again(self):
        """One fault at a time: with backup_count = 1 a second death before the partitions are
        backed up again may take a last copy (as in Hazelcast: wait for is_safe between them)."""
        wait_for(lambda: self.client.is_safe(timeout=2), WAIT)

    def check(self):
        """(The subclass) every structure equals its model."""

    def teardown(self):
        try:
            self.check()
        finally:
            self.client.close()
            self.cluster.terminate()


class DataThroughFaults(ThroughFaults):
    def __init__(self):
        super().__init__()
        self.map, self.model = self.client.get_map("model-map"), {}
        self.queue, self.items = self.client.get_queue("model-queue"), collections.deque()
        self.counter, self.count = self.client.get_counter("model-counter"), 0

    # -- the structures --------------------------------------------------------------------------

    @rule(key=KEYS, value=st.integers())
    def put(self, key, value):
        assert self.map.put(key, value) == self.model.get(key)
        self.model[key] = value

    @rule(key=KEYS)
    def pop(self, key):
        assert self.map.pop(key, None) == self.model.pop(key, None)

    @rule(key=KEYS, value=st.integers())
    def put_if_absent(self, key, value):
        assert self.map.put_if_absent(key, value) == self.model.get(key)
        self.model.setdefault(key, value)

    @rule(key=KEYS)
    def get(self, key):
        assert self.map.get(key) == self.model.get(key)

    @rule(delta=st.integers(-5, 5))
    def add(self, delta):
        self.count += delta
        assert self.counter.add_and_get(delta) == self.count

    @rule(item=st.integers())
    def offer(self, item):
        self.queue.put(item)
        self.items.append(item)

    @rule()
    def take(self):
        if self.items:
            assert self.queue.get(timeout=WAIT) == self.items.popleft()
        else:
            with pytest.raises(queue.Empty):
                self.queue.get_nowait()

    def check(self):
        assert dict(self.map) == self.model
        assert self.counter.get() == self.count
        assert self.queue.qsize() == len(self.items)
        assert [self.queue.get_nowait() for _ in range(len(self.items))] == list(self.items)


class ListsAndSetsThroughFaults(ThroughFaults):
    def __init__(self):
        super().__init__()
        self.list, self.list_model = self.client.get_list("model-list"), []
        self.set, self.set_model = self.client.get_set("model-set"), set()

    @rule(item=st.integers(0, 9))
    def append(self, item):
        self.list.append(item)
        self.list_model.append(item)

    @rule(index=st.integers(-4, 4), item=st.integers(0, 9))
    def insert(self, index, item):
        self.list.insert(index, item)
        self.list_model.insert(index, item)

    @rule(index=st.integers(-4, 4))
    def pop(self, index):
        if -len(self.list_model) <= index < len(self.list_model):
            assert self.list.pop(index) == self.list_model.pop(index)
        else:
            with pytest.raises(IndexError):
                self.list.pop(index)

    @rule(item=st.integers(0, 9))
    def remove(self, item):
        if item in self.list_model:
            self.list.remove(item)
            self.list_model.remove(item)
        else:
            with pytest.raises(ValueError):
                self.list.remove(item)

    @rule(start=st.integers(-4, 4), items=st.lists(st.integers(0, 9), max_size=3))
    def set_slice(self, start, items):
        self.list[start:start + 2] = items
        self.list_model[start:start + 2] = items

    @rule(reverse=st.booleans())
    def sort(self, reverse):
        self.list.sort(reverse=reverse)
        self.list_model.sort(reverse=reverse)

    @rule(item=st.integers(0, 9))
    def add(self, item):
        self.set.add(item)
        self.set_model.add(item)

    @rule(item=st.integers(0, 9))
    def discard(self, item):
        self.set.discard(item)
        self.set_model.discard(item)

    @rule(items=st.sets(st.integers(0, 9), max_size=4))
    def keep_only(self, items):
        self.set &= items
        self.set_model &= items

    @rule()
    def pop_member(self):
        if self.set_model:
            self.set_model.remove(self.set.pop())
        else:
            with pytest.raises(KeyError):
                self.set.pop()

    def check(self):
        assert self.list == self.list_model
        assert self.set == self.set_model


# A few examples: each fault takes seconds (failure detection, a join). No shrinking (a shrink
# replays faults for minutes); a failure prints its steps.
DataThroughFaults.TestCase.settings = settings(
    max_examples=3, stateful_step_count=25, deadline=None, phases=[Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_the_structures_match_their_models_through_kills_joins_and_freezes = DataThroughFaults.TestCase
ListsAndSetsThroughFaults.TestCase.settings = DataThroughFaults.TestCase.settings
test_lists_and_sets_match_their_models_through_kills_joins_and_freezes = ListsAndSetsThroughFaults.TestCase
