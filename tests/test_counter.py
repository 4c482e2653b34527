"""Counter (grid.data.counter) over replicas in this process (LocalBackend)."""

from __future__ import annotations

import threading

import pytest

from grid.cluster.partitions import partition_of
from grid.data.counter import Counter
from grid.data.store import COUNTER, LocalBackend, Op


def test_a_counter_counts_and_compares_and_sets():
    counter = Counter("hits", LocalBackend(partitions=7))
    assert counter.get() == 0
    assert (counter.increment_and_get(), counter.add_and_get(5), counter.get_and_add(-2)) == (1, 6, 6)
    assert (counter.decrement_and_get(), counter.get()) == (3, 3)
    assert counter.compare_and_set(2, 10) is False and counter.compare_and_set(3, 10) is True
    counter.set(-4)
    assert counter.get() == -4


def test_two_handles_on_one_name_share_it_and_other_names_do_not():
    backend = LocalBackend(partitions=7)
    one, other, elsewhere = Counter("c", backend), Counter("c", backend), Counter("d", backend)
    one.add_and_get(2)
    other.add_and_get(3)
    assert one.get() == other.get() == 5 and elsewhere.get() == 0


def test_concurrent_increments_from_many_threads_and_handles_are_all_counted():
    backend = LocalBackend(partitions=3)
    counter = Counter("c", backend)
    threads = [threading.Thread(target=lambda: [Counter("c", backend).increment_and_get() for _ in range(200)])
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert counter.get() == 800


def test_a_retried_change_applies_once():
    backend = LocalBackend(partitions=7)
    counter = Counter("c", backend)
    partition = partition_of("c", 7)
    op = Op(COUNTER, "c", "add_and_get", (5,), "caller:1")
    assert backend.execute(partition, op) == 5 and backend.execute(partition, op) == 5
    assert counter.get() == 5


@pytest.mark.parametrize("bad", [1.5, "1", True, None])
def test_a_counter_takes_ints_only(bad):
    counter = Counter("c", LocalBackend(partitions=3))
    with pytest.raises(TypeError, match="takes ints"):
        counter.add_and_get(bad)
    with pytest.raises(TypeError, match="non-empty str"):
        Counter(5, LocalBackend(partitions=3))
