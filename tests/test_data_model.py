"""Model-based: a DMap, a DQueue and a Counter on a sim cluster against dict, deque and int, while
Hypothesis interleaves their operations with member kills, joins and freezes past failure_timeout.

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


class DataThroughFaults(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cluster = LocalCluster(3, **TIMING)
        self.client = self.cluster.connect()
        self.alive = [0, 1, 2]  # peer indexes running
        self.map, self.model = self.client.get_map("model-map"), {}
        self.queue, self.items = self.client.get_queue("model-queue"), collections.deque()
        self.counter, self.count = self.client.get_counter("model-counter"), 0

    @initialize()
    def started(self):
        wait_for(lambda: len(self.client.partitions().members()) == 3, WAIT)

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

    def teardown(self):
        try:
            assert dict(self.map) == self.model
            assert self.counter.get() == self.count
            assert self.queue.qsize() == len(self.items)
            assert [self.queue.get_nowait() for _ in range(len(self.items))] == list(self.items)
        finally:
            self.client.close()
            self.cluster.terminate()


# A few examples: each fault takes seconds (failure detection, a join). No shrinking (a shrink
# replays faults for minutes); a failure prints its steps.
DataThroughFaults.TestCase.settings = settings(
    max_examples=3, stateful_step_count=25, deadline=None, phases=[Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_the_structures_match_their_models_through_kills_joins_and_freezes = DataThroughFaults.TestCase
