"""Where the executor's Futures are completed (``grid.compute.completions``), in one process."""

from __future__ import annotations

import collections
import pickle
import threading

import pytest

from grid.compute import completions, dispatch
from grid.compute.completions import Completions, future_class

from .conftest import wait_for

TIMEOUT = 30


class Reduced:
    """Unpickling it calls a function: user code."""

    def __reduce__(self):
        return (collections.OrderedDict, ())


@pytest.mark.parametrize("value", [None, True, 0, 7, -2**70, 2.5, b"xyz", bytearray(b"x"), "text", [], [1, 2, [3]],
                                   (1, 2), {1: 2.0}, {1, 2}, frozenset({3})])
def test_plain_data_is_plain(value):
    assert completions.plain(pickle.dumps(value, 5)), "the IO thread may complete it"


@pytest.mark.parametrize("value", [Reduced(), collections.OrderedDict(), range(3), ValueError("x"),
                                   [1, Reduced()], {"key": Reduced()}, threading.Event, len])
def test_anything_that_looks_something_up_is_not_plain(value):
    assert not completions.plain(pickle.dumps(value, 5)), "unpickling it runs code: never on the IO thread"


@pytest.fixture
def queue():
    work = Completions(name="grid-results-test")
    yield work
    work.close()


def test_a_waiter_runs_the_queued_work_on_its_own_thread(queue):
    future = future_class(queue)()
    ran_on = []

    def complete():
        ran_on.append(threading.current_thread())
        future.set_result(5)

    waiting = threading.Event()
    # Queued once the caller waits: it must be the caller that completes it.
    threading.Thread(target=lambda: (waiting.wait(TIMEOUT), wait_for(lambda: queue._waiters, TIMEOUT),
                                     queue.put(complete))).start()
    waiting.set()
    assert future.result(timeout=TIMEOUT) == 5
    assert ran_on == [threading.current_thread()]


def test_with_nobody_waiting_the_results_thread_runs_it(queue):
    future = future_class(queue)()
    ran_on = []
    queue.put(lambda: (ran_on.append(threading.current_thread().name), future.set_result(1)))
    wait_for(future.done, TIMEOUT, "the results thread")
    assert ran_on == ["grid-results-test"]


def test_a_waiter_busy_in_a_blocking_callback_does_not_hold_up_other_work(queue):
    blocked = future_class(queue)()
    other = future_class(queue)()
    release, in_callback = threading.Event(), threading.Event()
    blocked.add_done_callback(lambda _: (in_callback.set(), release.wait(TIMEOUT)))
    result = []
    waiter = threading.Thread(target=lambda: result.append(blocked.result(TIMEOUT)))
    waiter.start()
    # The waiter sleeps in result() before the work comes, so it is the one that runs the callback
    # (queued first, the work could go to the results thread, which then blocks: by design).
    wait_for(lambda: any(w.sleeping for w in queue._waiters), TIMEOUT, "the waiter to wait")
    queue.put(blocked.set_result, 1)
    try:
        assert in_callback.wait(TIMEOUT)
        queue.put(other.set_result, 2)  # the results thread (or a waiter) takes it: nobody is stuck
        wait_for(other.done, TIMEOUT, "the other Future")
        assert other.result(0) == 2
    finally:
        release.set()
        waiter.join(TIMEOUT)
    assert result == [1]


def test_a_future_completed_elsewhere_wakes_its_waiter_and_timeouts_hold(queue):
    future = future_class(queue)()
    with pytest.raises(TimeoutError):
        future.result(timeout=0.05)
    threading.Timer(0.05, future.cancel).start()
    with pytest.raises(Exception) as raised:
        future.result(timeout=TIMEOUT)
    assert type(raised.value).__name__ == "CancelledError"


def test_close_runs_what_is_queued(queue):
    future = future_class(queue)()
    release = threading.Event()
    queue.put(release.wait, TIMEOUT)  # the results thread is busy
    queue.put(future.set_result, 3)
    release.set()
    queue.close()
    assert future.done() and future.result(0) == 3


def test_shutdowns_wait_ends_when_the_last_outstanding_task_ends_without_a_future():
    """A cancelled task dropped from a link's outbox ends no Future: the count alone reaching 0 must wake
    shutdown, which waits (helping) for it. It hung a full run once in three."""
    dispatcher = dispatch.Dispatcher()
    try:
        with dispatcher._lock:
            dispatcher._outstanding = 1
        ended = threading.Event()

        def shutdown_wait():
            dispatcher._completions.wait(None, lambda: dispatcher._outstanding <= 0, None)
            ended.set()

        waiter = threading.Thread(target=shutdown_wait)
        waiter.start()
        wait_for(lambda: dispatcher._completions._waiters, TIMEOUT, "the waiter")
        with dispatcher._lock:
            dispatcher._finish_outstanding(1)
        assert ended.wait(TIMEOUT), "the count reaching 0 woke it"
        waiter.join(TIMEOUT)
    finally:
        dispatcher._completions.close()
