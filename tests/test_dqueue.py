"""DQueue's queue.Queue behaviour (grid.data.dqueue), over replicas in this process (LocalBackend)."""

from __future__ import annotations

import collections
import queue
import threading
import time

import pytest

from grid.cluster.partitions import partition_of
from grid.data.dqueue import DQueue
from grid.data.store import QUEUE, LocalBackend, Op
from grid.net import serialize

from .conftest import wait_for

PARTITIONS = 7


class WatchedBackend(LocalBackend):
    """A LocalBackend that notes the ops it runs and how often a caller waited for a change."""

    def __init__(self, partitions: int = PARTITIONS):
        super().__init__(partitions)
        self.ops: list = []  # (partition, op)
        self.waits = 0  # calls that wait (seen given), counted as they begin

    def execute(self, partition, op):
        self.ops.append((partition, op))
        return super().execute(partition, op)

    def wait_for_change(self, partition, seen=None, timeout=None):
        if seen is not None:
            self.waits += 1
        return super().wait_for_change(partition, seen, timeout)

    def polls(self) -> int:
        return sum(op.action == "poll" for _, op in self.ops)


class Threads:
    """The threads a test starts; ``join`` joins them all and raises the first exception one raised."""

    def __init__(self):
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    def start(self, fn, *args) -> None:
        def run():
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - pytest.fail too; join re-raises it in the test
                self._errors.append(exc)

        thread = threading.Thread(target=run, name=f"test-dqueue-{len(self._threads)}")
        thread.start()
        self._threads.append(thread)

    def join(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [thread.name for thread in self._threads if thread.is_alive()]
        assert not alive, f"threads still running after {timeout} s: {alive}"
        if self._errors:
            raise self._errors[0]


@pytest.fixture
def threads():
    started = Threads()
    yield started
    started.join()


def test_items_come_out_in_the_order_they_went_in():
    dqueue = DQueue("jobs", LocalBackend(PARTITIONS))
    for item in ["a", None, 3, ("t", [1])]:
        dqueue.put(item)
    assert dqueue.put_all(range(4)) == 4
    assert [dqueue.get() for _ in range(4)] == ["a", None, 3, ("t", [1])]
    assert [dqueue.get_nowait(), dqueue.poll()] == [0, 1] and dqueue.drain() == [2, 3]


def test_an_empty_queue_raises_empty_and_polls_the_default():
    dqueue = DQueue("jobs", LocalBackend(PARTITIONS))
    with pytest.raises(queue.Empty):
        dqueue.get_nowait()
    with pytest.raises(queue.Empty):
        dqueue.get(block=False)
    assert dqueue.poll() is None and dqueue.poll(default="none") == "none"


def test_a_full_bounded_queue_raises_full_and_offers_false():
    dqueue = DQueue("jobs", LocalBackend(PARTITIONS), maxsize=2)
    dqueue.put_nowait(1)
    assert dqueue.offer(2) is True
    with pytest.raises(queue.Full):
        dqueue.put_nowait(3)
    with pytest.raises(queue.Full):
        dqueue.put(3, block=False)
    assert dqueue.offer(3) is False
    assert dqueue.drain() == [1, 2], "no refused item went in"


def test_a_timed_get_on_an_empty_queue_waits_at_least_its_timeout():
    backend = WatchedBackend()
    dqueue = DQueue("jobs", backend)
    start = time.monotonic()
    with pytest.raises(queue.Empty):
        dqueue.get(timeout=0.05)
    assert time.monotonic() - start >= 0.05
    start = time.monotonic()
    assert dqueue.poll(timeout=0.05, default="none") == "none"
    assert time.monotonic() - start >= 0.05
    assert backend.polls() <= 4, "it tries when the partition changes, and once at the deadline: no polling"


def test_a_timed_put_on_a_full_queue_waits_at_least_its_timeout():
    dqueue = DQueue("jobs", LocalBackend(PARTITIONS), maxsize=1)
    dqueue.put("first")
    start = time.monotonic()
    with pytest.raises(queue.Full):
        dqueue.put("second", timeout=0.05)
    assert time.monotonic() - start >= 0.05
    start = time.monotonic()
    assert dqueue.offer("second", timeout=0.05) is False
    assert time.monotonic() - start >= 0.05
    assert dqueue.drain() == ["first"]


def test_a_blocked_get_is_woken_by_a_put_from_another_thread(threads):
    backend = WatchedBackend()
    dqueue = DQueue("jobs", backend)
    got = []
    threads.start(lambda: got.append(dqueue.get(timeout=10)))
    threads.start(lambda: got.append(dqueue.poll(timeout=10)))
    wait_for(lambda: backend.waits >= 2, message="both gets to wait")
    DQueue("jobs", backend).put("wake")
    wait_for(lambda: got, message="a get to return")
    dqueue.put("and you")
    threads.join()
    assert sorted(got) == ["and you", "wake"]
    call_ids = [op.call_id for _, op in backend.ops if op.call_id is not None]
    assert len(call_ids) == len(set(call_ids)), "every try is a new call: a retry reusing one would get []"


class PutAfterEmptyPoll(WatchedBackend):
    """Another client's put lands just after the first empty poll, before the poller waits."""

    def __init__(self):
        super().__init__()
        self.woken: list[bool] = []  # per wait: did it end with a change (not the timeout)

    def execute(self, partition, op):
        result = super().execute(partition, op)
        if op.action == "poll" and not result and self.polls() == 1:
            super().execute(partition, Op(QUEUE, op.name, "offer", (serialize.dumps("late"), 0), "other:1"))
        return result

    def wait_for_change(self, partition, seen=None, timeout=None):
        now = super().wait_for_change(partition, seen, timeout)
        if seen is not None:
            self.woken.append(now != seen)
        return now


def test_a_put_between_the_empty_poll_and_the_wait_is_not_missed():
    backend = PutAfterEmptyPoll()
    assert DQueue("jobs", backend).get(timeout=2) == "late"
    assert backend.woken == [True], "the wait saw the change made before it began, and did not time out"


def test_blocked_gets_do_not_wake_each_other_with_their_empty_polls(threads):
    backend = WatchedBackend()
    dqueue = DQueue("jobs", backend)
    for _ in range(3):
        threads.start(lambda: pytest.raises(queue.Empty, dqueue.get, timeout=0.2))
    threads.join()
    assert backend.polls() <= 3 * 3, f"{backend.polls()} polls: the waiters woke each other"


def test_a_blocked_put_on_a_full_queue_is_released_by_a_get(threads):
    backend = WatchedBackend()
    dqueue = DQueue("jobs", backend, maxsize=1)
    dqueue.put("first")
    threads.start(lambda: dqueue.put("second", timeout=10))
    wait_for(lambda: backend.waits >= 1, message="the put to wait")
    assert dqueue.qsize() == 1
    assert dqueue.get() == "first"
    threads.join()
    assert dqueue.drain() == ["second"]


def test_join_waits_for_every_item_to_be_done(threads):
    backend = WatchedBackend()
    dqueue = DQueue("jobs", backend)
    assert dqueue.join() is True, "nothing put, nothing to wait for"
    dqueue.put_all(["a", "b"])
    assert dqueue.join(timeout=0) is False
    assert dqueue.get() == "a"
    dqueue.task_done()
    start = time.monotonic()
    assert dqueue.join(timeout=0.05) is False and time.monotonic() - start >= 0.05
    joined = []
    threads.start(lambda: joined.append(dqueue.join(timeout=10)))
    wait_for(lambda: backend.waits >= 2, message="the join to wait")
    assert dqueue.get() == "b" and not joined, "got is not done"
    DQueue("jobs", backend).task_done()
    threads.join()
    assert joined == [True]
    with pytest.raises(ValueError, match=r"task_done\(\) called too many times"):
        dqueue.task_done()
    assert dqueue.join(timeout=0) is True


def test_drain_takes_up_to_max_items_in_order():
    dqueue = DQueue("jobs", LocalBackend(PARTITIONS))
    dqueue.put_all(range(5))
    assert dqueue.drain(0) == [] and dqueue.drain(2) == [0, 1] and dqueue.drain(10) == [2, 3, 4]
    assert dqueue.drain() == []
    with pytest.raises(ValueError, match="negative"):
        dqueue.drain(-1)
    with pytest.raises(TypeError, match="max_items"):
        dqueue.drain(1.5)


def test_peek_shows_the_head_and_leaves_it():
    dqueue = DQueue("jobs", LocalBackend(PARTITIONS))
    assert dqueue.peek() is None and dqueue.peek("empty") == "empty"
    dqueue.put(None)
    dqueue.put("next")
    assert dqueue.peek("empty") is None, "a None item is an item"
    assert dqueue.qsize() == 2 and dqueue.get() is None and dqueue.peek() == "next"


def test_clear_removes_every_item_and_join_stops_waiting_for_them():
    dqueue = DQueue("jobs", LocalBackend(PARTITIONS))
    dqueue.put_all("abcd")
    assert dqueue.get() == "a"  # got, not yet done: it still counts for join
    assert dqueue.clear() == 3 and dqueue.empty() and dqueue.clear() == 0
    assert dqueue.join(timeout=0) is False, "the item got and not done still counts"
    dqueue.task_done()
    assert dqueue.join(timeout=0) is True, "cleared items were never got and will never be done"
    with pytest.raises(ValueError, match="too many times"):
        dqueue.task_done()


def test_sizes_of_a_bounded_queue():
    dqueue = DQueue("jobs", LocalBackend(PARTITIONS), maxsize=2)
    assert (dqueue.qsize(), len(dqueue), dqueue.empty(), dqueue.full(), bool(dqueue)) == (0, 0, True, False, False)
    dqueue.put(1)
    assert (dqueue.qsize(), len(dqueue), dqueue.empty(), dqueue.full(), bool(dqueue)) == (1, 1, False, False, True)
    assert dqueue.put_all([2, 3, 4]) == 1, "only the room there is"
    assert (dqueue.qsize(), dqueue.full(), dqueue.maxsize) == (2, True, 2)
    assert dqueue.drain() == [1, 2]
    unbounded = DQueue("other", LocalBackend(PARTITIONS))
    assert unbounded.put_all(range(100)) == 100 and not unbounded.full() and unbounded.maxsize == 0
    assert repr(dqueue) == "<DQueue 'jobs' maxsize=2>"


def test_an_item_that_cannot_be_pickled_is_refused_and_nothing_sent():
    backend = WatchedBackend()
    dqueue = DQueue("jobs", backend, maxsize=1)
    dqueue.put("kept")
    sent = len(backend.ops)
    for put in (dqueue.put, dqueue.put_nowait, dqueue.offer, lambda item: dqueue.put_all(["x", item])):
        with pytest.raises(TypeError, match="cannot pickle"):
            put(threading.Lock())
    assert len(backend.ops) == sent, "refused before anything was sent"
    assert dqueue.drain() == ["kept"]


def test_bad_names_sizes_and_timeouts_are_refused():
    backend = LocalBackend(PARTITIONS)
    for name in ("", 5, None, b"jobs"):
        with pytest.raises(TypeError, match="non-empty str"):
            DQueue(name, backend)
    for maxsize in (True, 1.5, "3"):
        with pytest.raises(TypeError, match="maxsize"):
            DQueue("jobs", backend, maxsize)
    dqueue = DQueue("jobs", backend)
    for call in (lambda: dqueue.get(timeout=-1), lambda: dqueue.put(1, timeout=-0.5),
                 lambda: dqueue.offer(1, timeout=-1), lambda: dqueue.poll(timeout=-1),
                 lambda: dqueue.join(timeout=-1)):
        with pytest.raises(ValueError, match="'timeout' must be a non-negative number"):
            call()
    with pytest.raises(queue.Empty):
        dqueue.get(block=False, timeout=-1)  # as queue.Queue: no block, no timeout to check
    assert dqueue.empty(), "the refused put put nothing"


def test_many_producers_and_consumers_get_every_item_exactly_once(threads):
    backend = LocalBackend(PARTITIONS)
    producers, consumers, per_producer = 4, 4, 500
    got: list[list] = [[] for _ in range(consumers)]

    def produce(producer):
        dqueue = DQueue("jobs", backend, maxsize=50)  # bounded, so that puts wait too
        for number in range(per_producer):
            dqueue.put((producer, number), timeout=30)

    def consume(mine):
        dqueue = DQueue("jobs", backend)
        while (item := dqueue.get(timeout=30)) is not None:
            mine.append(item)
            dqueue.task_done()
        dqueue.task_done()

    for consumer in range(consumers):
        threads.start(consume, got[consumer])
    for producer in range(producers):
        threads.start(produce, producer)
    wait_for(lambda: sum(map(len, got)) == producers * per_producer, timeout=30, message="every item")
    stopper = DQueue("jobs", backend)
    for _ in range(consumers):
        stopper.put(None)
    threads.join()
    everything = [item for mine in got for item in mine]
    assert collections.Counter(everything) == {(p, n): 1 for p in range(producers) for n in range(per_producer)}
    for mine in got:  # FIFO: each consumer sees a producer's items in the order it put them
        for producer in range(producers):
            numbers = [number for p, number in mine if p == producer]
            assert numbers == sorted(numbers)
    assert stopper.empty() and stopper.join(timeout=0) is True


def test_two_handles_on_one_name_see_one_queue_and_other_names_do_not():
    backend = LocalBackend(PARTITIONS)
    one, other, elsewhere = DQueue("jobs", backend), DQueue("jobs", backend), DQueue("mail", backend)
    one.put(1)
    other.put(2)
    assert (one.qsize(), other.qsize(), elsewhere.qsize()) == (2, 2, 0)
    assert other.get() == 1 and one.get() == 2 and one.empty()


def test_handles_with_different_maxsize_share_items_not_the_bound():
    backend = LocalBackend(PARTITIONS)
    small, unbounded = DQueue("jobs", backend, maxsize=1), DQueue("jobs", backend)
    small.put("a")
    assert small.offer("b") is False and unbounded.offer("b") is True
    assert small.full() and not unbounded.full() and small.qsize() == 2


def test_the_queue_lives_wholly_in_the_partition_of_its_name():
    backend = WatchedBackend()
    names = ["jobs", "mail", "ü", "a-much-longer-queue-name"]
    for name in names:
        DQueue(name, backend).put_all(range(3))
    for name in names:
        partition = partition_of(name, PARTITIONS)
        assert {p for p, op in backend.ops if op.name == name} == {partition}
        replica = backend._replicas[partition]  # the backend's own: the test looks inside
        assert (QUEUE, name, 3) in replica.structures()
    held = [(partition, name) for partition, replica in backend._replicas.items()
            for _, name, _ in replica.structures()]
    assert sorted(held) == sorted((partition_of(name, PARTITIONS), name) for name in names)
