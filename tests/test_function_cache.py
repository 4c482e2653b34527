"""Functions an executor sends stay bounded on the members: what the executor's cache drops,
its members forget.

The worker tests feed ``TaskRunner`` frames directly (no sockets); the others run a
member in this process (``grid.Peer``), so they can look at its per-link table while an
executor sends it a new closure on every call.
"""

from __future__ import annotations

import queue
import threading
import uuid

import pytest

import grid
from grid.compute import dispatch, protocol, worker
from grid.net import serialize

from .conftest import wait_for

RESULT_TIMEOUT = 30  # seconds; a hang fails the test instead of blocking the run
SMALL_CACHE = 16

_gate = threading.Event()  # module globals: the member runs in this process, and pickles these by name
_at_gate = threading.Event()


def wait_at_gate():
    """Hold a task thread until the test opens the gate."""
    _at_gate.set()
    if not _gate.wait(RESULT_TIMEOUT):
        raise TimeoutError("the test never opened the gate")
    return "through"


def times(factor):
    """A new closure on every call: a new function object that travels by value."""
    return lambda x=1: x * factor


def noop():
    return None


# -- the worker alone: frames in, results out ------------------------------------------------------------------


class _Router:
    def register(self, message_type, handler, any_thread=False):
        pass


class _Link:
    """Stands in for an executor link on the member's side: keeps the frames sent on it."""

    def __init__(self):
        self.attachment = None
        self.driver = self
        self.sent: queue.SimpleQueue = queue.SimpleQueue()

    def send_frame(self, kind, parts):
        self.sent.put(parts)

    def lend_reading(self):  # no socket: frames are fed in by the test, as by the IO thread
        return False

    def call_later(self, delay, callback, *args):
        callback(*args)

    def results(self) -> dict:
        """``{task id: (status, value)}`` of the next results frame."""
        parts = self.sent.get(timeout=RESULT_TIMEOUT)
        message_type, results = serialize.loads_parts(parts if isinstance(parts, list) else [parts])
        assert message_type == "results"
        return {task_id: (status, protocol.unpack_value(value) if status == worker.OK else value)
                for task_id, status, value, _ in results}


@pytest.fixture
def runner():
    tasks = worker.TaskRunner(_Router(), workers=1)
    try:
        yield tasks
    finally:
        _gate.set()
        tasks.close()
        _gate.clear()
        _at_gate.clear()


def test_a_task_queued_before_its_function_was_forgotten_still_runs(runner):
    link = _Link()
    runner._on_tasks(link, ([], [(1, serialize.dumps_function(wait_at_gate))], [(10, 1, worker.CALL, *protocol.pack_arguments((), {}))]))
    assert _at_gate.wait(RESULT_TIMEOUT)  # the only task thread is held: what comes next waits in the queue
    runner._on_tasks(link, ([], [(2, serialize.dumps_function(times(3)))], [(11, 2, worker.CALL, *protocol.pack_arguments((5,), {}))]))
    runner._on_tasks(link, ([1, 2], [], []))

    assert link.attachment.functions == {}, "both ids are forgotten at once, on the IO thread"
    _gate.set()
    results = {}
    while len(results) < 2:
        results.update(link.results())
    assert results == {10: (worker.OK, "through"), 11: (worker.OK, 15)}


def test_a_task_held_for_the_initializer_keeps_its_function_through_a_forget(runner):
    link = _Link()
    runner._on_init(link, serialize.dumps((wait_at_gate, ())))
    assert _at_gate.wait(RESULT_TIMEOUT)  # the initializer runs: tasks are held until it is done
    runner._on_tasks(link, ([], [(1, serialize.dumps_function(times(3)))], [(10, 1, worker.CALL, *protocol.pack_arguments((5,), {}))]))
    runner._on_tasks(link, ([1], [], []))
    assert link.attachment.functions == {} and len(link.attachment.held) == 1

    _gate.set()
    assert link.results() == {10: (worker.OK, 15)}


def test_an_id_forgotten_and_sent_again_in_one_frame_runs_the_new_function(runner):
    link = _Link()
    runner._on_tasks(link, ([], [(1, serialize.dumps_function(times(2)))], [(10, 1, worker.CALL, *protocol.pack_arguments((5,), {}))]))
    assert link.results() == {10: (worker.OK, 10)}

    runner._on_tasks(link, ([1], [(1, serialize.dumps_function(times(3)))], [(11, 1, worker.CALL, *protocol.pack_arguments((5,), {}))]))
    assert link.results() == {11: (worker.OK, 15)}, "the forget comes before the frame's functions"
    assert list(link.attachment.functions) == [1]


def test_a_task_of_a_forgotten_function_fails_saying_so_instead_of_hanging(runner):
    link = _Link()
    runner._on_tasks(link, ([], [(1, serialize.dumps_function(noop))], []))
    runner._on_tasks(link, ([1], [], [(10, 1, worker.CALL, *protocol.pack_arguments((), {}))]))
    [(status, (pickled, _))] = link.results().values()
    assert status == worker.FAILED
    assert "function 1 was never sent on this link, or was forgotten" in str(serialize.loads(pickled))


def thread_name():
    return threading.current_thread().name


def test_quick_functions_never_run_on_the_io_thread(runner):
    """The IO thread (here: the test's thread, which calls _on_tasks) only queues: however
    often a function ran quickly, it runs, and is unpickled, on a task thread."""
    link = _Link()
    runner._on_tasks(link, ([], [(1, serialize.dumps_function(thread_name))], []))
    for task_id in range(10):
        runner._on_tasks(link, ([], [], [(task_id, 1, worker.CALL, *protocol.pack_arguments((), {}))]))
        ((status, name),) = link.results().values()
        assert status == worker.OK and name.startswith("grid-task-"), name
    runner._on_tasks(link, ([1], [], []))
    assert link.attachment.functions == {}


# -- an executor and a member in this process -------------------------------------------------------------------


@pytest.fixture(scope="module")
def member():
    """A member with one task thread running in this process, and a client of it."""
    base = {"id": f"function-cache-{uuid.uuid4().hex[:8]}", "secret": "function-cache-test", "join": "tcp",
            "interface": "127.0.0.1", "join_timeout": 0.2}
    peer = grid.Peer(dict(base, port=0, workers=1)).start(10)
    try:
        with grid.connect(dict(base, members=["%s:%d" % peer.address])) as cluster:
            yield peer, cluster
    finally:
        peer.close()


def _link_states(peer) -> list:
    return [conn.attachment for conn in peer.transport.connections
            if isinstance(conn.attachment, worker._LinkState)]


@pytest.fixture
def linked(member, monkeypatch):
    """``(executor, its link, the member's state of that link)``, with a small function cache."""
    monkeypatch.setattr(dispatch, "_FUNCTION_CACHE", SMALL_CACHE)
    peer, cluster = member
    before = _link_states(peer)
    executor = grid.GridExecutor(cluster=cluster)
    try:
        executor.submit(noop).result(RESULT_TIMEOUT)  # the member makes the link's state on its first frame
        [state] = wait_for(lambda: [state for state in _link_states(peer) if all(state is not old for old in before)],
                           RESULT_TIMEOUT, "the member's state of the new link")
        [link] = executor._links.values()
        yield executor, link, state
    finally:
        _gate.set()
        executor.shutdown()
        _gate.clear()
        _at_gate.clear()


def _assert_settled(executor, link, state) -> None:
    """With nothing in flight, one more frame leaves the member holding exactly what the executor
    thinks it holds: what is cached, and no more."""
    assert executor.submit(noop).result(RESULT_TIMEOUT) is None  # its frame carries the pending forgets
    cached = {function.id for _, function in executor._functions.values()}
    assert len(cached) == SMALL_CACHE
    assert set(state.functions) == link.sent_functions
    assert link.sent_functions <= cached


def test_a_new_closure_on_every_call_leaves_the_members_table_bounded(linked):
    executor, link, state = linked
    bound = SMALL_CACHE + link.member.workers * dispatch._MAX_CREDIT  # the cache, plus one frame's functions
    futures, largest_table, largest_sent = [], 0, 0
    for index in range(2000):
        futures.append(executor.submit(times(index), 3))
        largest_table = max(largest_table, len(state.functions))
        largest_sent = max(largest_sent, len(link.sent_functions))

    assert [future.result(RESULT_TIMEOUT) for future in futures] == [3 * index for index in range(2000)]
    assert largest_table <= bound and largest_sent <= bound, (largest_table, largest_sent)
    _assert_settled(executor, link, state)


def test_a_task_whose_function_was_forgotten_while_it_waited_on_the_member_still_runs(linked, monkeypatch):
    executor, link, state = linked
    monkeypatch.setattr(dispatch, "MIN_CREDIT", 64)  # every task goes out at once, none waits in the executor
    held = executor.submit(wait_at_gate)
    assert _at_gate.wait(RESULT_TIMEOUT)  # the member's only task thread is held
    doomed = times(14)
    function = executor.function_for(doomed)
    waiting = executor.submit(doomed, 3)
    wait_for(lambda: function.id in state.functions, RESULT_TIMEOUT, "the doomed function on the member")

    others = [executor.submit(times(index), 3) for index in range(2 * SMALL_CACHE)]
    assert function.evicted
    wait_for(lambda: function.id not in state.functions, RESULT_TIMEOUT, "the member to forget it")
    assert not waiting.done() and all(not future.done() for future in others), "all still queued on the member"

    _gate.set()
    assert held.result(RESULT_TIMEOUT) == "through"
    assert waiting.result(RESULT_TIMEOUT) == 42
    assert [future.result(RESULT_TIMEOUT) for future in others] == [3 * index for index in range(2 * SMALL_CACHE)]
    _assert_settled(executor, link, state)


def test_a_function_in_use_keeps_working_while_new_ones_push_it_out_of_the_cache(linked):
    executor, link, state = linked
    hot = times(7)
    futures = []
    for index in range(10 * SMALL_CACHE):
        futures.append(executor.submit(hot, index))
        futures.append(executor.submit(times(index), 1))  # pushes the oldest out: hot too, now and then
    expected = [value for index in range(10 * SMALL_CACHE) for value in (7 * index, index)]
    assert [future.result(RESULT_TIMEOUT) for future in futures] == expected
    _assert_settled(executor, link, state)


def test_a_map_goes_on_after_its_function_left_the_cache(linked):
    executor, link, state = linked
    doubled = times(2)
    first = executor.function_for(doubled)

    def items():
        for index in range(200):
            if index % 20 == 10:  # while the map runs, enough new functions to push its own out
                for other in range(SMALL_CACHE + 1):
                    assert executor.submit(times(other), 1).result(RESULT_TIMEOUT) == other
            yield index

    assert list(executor.map(doubled, items(), chunksize=1)) == [2 * index for index in range(200)]
    assert first.evicted, "the map's function was dropped from the cache while it ran"
    assert first.id not in link.sent_functions
    _assert_settled(executor, link, state)


# -- who reads the executor link ---------------------------------------------------------------------------------------


def test_tasks_round_trip_while_the_members_io_thread_is_busy(member, linked):
    """The member's task threads read the executor link themselves (``net.lending``): a task
    needs no hand-off from the IO thread, so it runs while that thread is held up."""
    peer, _ = member
    executor, _, _ = linked
    held, holding = threading.Event(), threading.Event()

    def hold_io_thread():
        holding.set()
        held.wait(RESULT_TIMEOUT)

    peer.transport.call_soon(hold_io_thread)
    try:
        assert holding.wait(RESULT_TIMEOUT)
        names = [executor.submit(thread_name).result(RESULT_TIMEOUT) for _ in range(20)]
        assert all(name.startswith("grid-task-") for name in names)
        assert list(executor.map(square, range(50))) == [n * n for n in range(50)]
    finally:
        held.set()


def square(n):
    return n * n
