"""GridExecutor conformance: one suite run against the embedded default and a sim cluster.

Each test behaves as a ``concurrent.futures`` user expects from ``ProcessPoolExecutor``.
Most tests share one executor per backend (module scope) and leave it idle; the
``executor`` fixture checks that. Tests that shut an executor down make their own.
"""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import weakref
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, as_completed, wait

import pytest

import grid
from grid.errors import RemoteTraceback
from sim import LocalCluster

from . import executor_helpers as helpers
from .conftest import wait_for

RESULT_TIMEOUT = 30  # seconds; a hang fails the test instead of blocking the run


class CustomError(Exception):
    """An exception class defined in the test module; members import it by name."""


class NeedsTwoArguments(Exception):
    """Pickles but cannot be unpickled: ``__reduce__`` gives only ``args``, __init__ needs two."""

    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")


def raise_custom(message):
    raise CustomError(message)


def raise_needs_two(what):
    raise NeedsTwoArguments(what, "because")


def module_level_double(x):
    return 2 * x


# -- backends ---------------------------------------------------------------------------------------------


class Backend:
    """Makes executors of one kind; ``shared`` is the module-wide one."""

    def __init__(self, name: str, directory):
        self.name = name
        self.directory = directory
        self.sim: LocalCluster | None = None
        self.shared: grid.GridExecutor | None = None

    def new_executor(self, **kwargs) -> grid.GridExecutor:
        """A fresh executor; the caller shuts it down (``close`` also closes its client)."""
        if self.name == "embedded":
            with pytest.MonkeyPatch.context() as patch:
                patch.delenv("GRID", raising=False)
                patch.delenv("GRID_SECRET", raising=False)
                patch.setenv("HOME", str(self.directory))  # no ~/.grid/grid.toml either
                patch.chdir(self.directory)  # no ./grid.toml in sight: the embedded default
                executor = grid.GridExecutor(max_workers=2, **kwargs)
            assert executor._embedded is not None, "expected an embedded cluster"
            return executor
        client = grid.connect(self.sim.config())
        try:
            return grid.GridExecutor(cluster=client, **kwargs)
        except BaseException:
            client.close()
            raise

    @staticmethod
    def close(executor: grid.GridExecutor) -> None:
        """Shut ``executor`` down (waiting) and close its client if it does not own it."""
        executor.shutdown(wait=True)
        if not executor._owns_cluster:
            executor.cluster.close()


@pytest.fixture(scope="module", params=["embedded", "sim", "sim-task-processes"])
def backend(request, tmp_path_factory):
    backend = Backend(request.param, tmp_path_factory.mktemp(f"executor-{request.param}"))
    if backend.name == "sim":
        backend.sim = LocalCluster(2)
    elif backend.name == "sim-task-processes":  # members run tasks in child processes (task_processes)
        backend.sim = LocalCluster(2, task_processes=2)
    try:
        backend.shared = backend.new_executor()
        yield backend
    finally:
        if backend.shared is not None:
            backend.close(backend.shared)
        if backend.sim is not None:
            backend.sim.terminate()


@pytest.fixture
def executor(backend):
    """The backend's shared executor; the test must leave it idle (nothing outstanding)."""
    yield backend.shared
    wait_for(lambda: backend.shared._outstanding == 0, RESULT_TIMEOUT, "the shared executor to go idle")
    assert not backend.shared._backlog


@pytest.fixture
def gate(tmp_path):
    """A file path that gated tasks wait for; ``gate.open()`` lets them finish."""

    class Gate:
        path = str(tmp_path / f"gate-{uuid.uuid4().hex}")

        def open(self):
            with open(self.path, "w"):
                pass

    gate = Gate()
    yield gate
    gate.open()  # never leave a member task thread blocked


def saturating_count(executor) -> int:
    """More tasks than the executor keeps in flight: the last ones wait in its backlog."""
    return executor.capacity() + 4


# -- submit -------------------------------------------------------------------------------------------------


def test_submit_returns_result(executor):
    future = executor.submit(helpers.square, 7)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(RESULT_TIMEOUT) == 49


def test_submit_passes_args_and_kwargs(executor):
    assert executor.submit(helpers.add, 1, 2, c=3).result(RESULT_TIMEOUT) == 6
    assert executor.submit(helpers.add, 1, b=10).result(RESULT_TIMEOUT) == 11
    assert executor.submit(sorted, [3, 1, 2], reverse=True).result(RESULT_TIMEOUT) == [3, 2, 1]


def test_many_submits_all_complete(executor):
    futures = [executor.submit(helpers.square, i) for i in range(500)]
    assert [f.result(RESULT_TIMEOUT) for f in futures] == [i * i for i in range(500)]


# -- map ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [None, 1, 7, 10_000])
def test_map_is_ordered(executor, chunksize):
    results = executor.map(helpers.square, range(1000), chunksize=chunksize)
    assert list(results) == [i * i for i in range(1000)]


@pytest.mark.parametrize("items", [range(0), range(5, 2000, 3), range(1000, -1000, -7), list(range(900)),
                                   tuple(range(-50, 850))], ids=["empty", "step", "negative", "list", "tuple"])
@pytest.mark.parametrize("chunksize", [None, 7])
def test_map_over_a_range_list_or_tuple_slices_it(executor, items, chunksize):
    assert list(executor.map(helpers.square, items, chunksize=chunksize)) == [i * i for i in items]


def test_a_range_travels_as_ranges(executor, monkeypatch):
    """A range's chunks are ranges: a few bytes on the wire for any number of items (the
    ints were made, pickled, sent and freed by the caller, 30% of its time in a fast map)."""
    from grid.net import connection

    sent = []
    send_frame = connection.Connection.send_frame

    def recording_send(self, kind, payload=b"", **kwargs):
        parts = payload if isinstance(payload, list) else [payload]
        if b"tasks" in bytes(memoryview(parts[0])[:32]):
            sent.append(sum(memoryview(part).nbytes for part in parts))
        return send_frame(self, kind, payload, **kwargs)

    monkeypatch.setattr(connection.Connection, "send_frame", recording_send)
    count = 200_000
    assert sum(executor.map(helpers.identity, range(count))) == count * (count - 1) // 2
    # (As lists, the 200,000 ints took about 1 MB; as ranges, tens of frames of 100-500 bytes.)
    assert sent and sum(sent) < 50_000, f"{len(sent)} tasks frames took {sum(sent)} bytes"


def test_a_member_takes_a_range_only_as_a_chunk():
    from grid.compute import protocol, worker

    def task(kind, args):
        return (1, 1, kind, *protocol.pack_arguments(args, {}))

    task_id, status, value, _ = worker.run_task(helpers.square, task(protocol.CHUNK1, range(3, 6)))
    assert status == protocol.OK and protocol.unpack_value(value) == [9, 16, 25]
    task_id, status, value, _ = worker.run_task(helpers.square, task(protocol.CALL, range(3)))
    assert status == protocol.FAILED and "args are a tuple or list" in str(grid.net.serialize.unpack_error(value))


def test_map_of_empty_iterable(executor):
    assert list(executor.map(helpers.square, [])) == []


def test_map_with_several_iterables_stops_at_the_shortest(executor):
    assert list(executor.map(helpers.add, range(10), range(100, 105))) == [100, 102, 104, 106, 108]
    assert list(executor.map(pow, [2, 3, 4], itertools.repeat(2))) == [4, 9, 16]


def test_map_is_lazy(executor):
    consumed = 0
    total = 1_000_000

    def items():
        nonlocal consumed
        for i in range(total):
            consumed += 1
            yield i

    results = executor.map(helpers.square, items())
    assert consumed < total
    assert [next(results) for _ in range(10)] == [i * i for i in range(10)]
    assert consumed < total
    results.close()


def test_map_raises_where_iteration_reaches_the_failure(executor):
    results = executor.map(helpers.fail_at, range(100), itertools.repeat(42), chunksize=5)
    seen = []
    with pytest.raises(ValueError, match="item 42 is bad") as caught:
        for value in results:
            seen.append(value)
    assert seen == list(range(42))
    assert isinstance(caught.value.__cause__, RemoteTraceback)
    assert "fail_at" in caught.value.__cause__.text


def test_map_timeout_raises_timeout_error(executor, gate):
    results = executor.map(helpers.gated, itertools.repeat(gate.path, 3), timeout=0.2)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        next(results)
    assert time.monotonic() - started < 5
    with pytest.raises(StopIteration):  # like the stdlib's map: done after raising
        next(results)
    gate.open()


def test_map_over_an_endless_iterable_stays_bounded(executor):
    pulled = 0

    def endless():
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    results = executor.map(helpers.identity, endless())
    most_outstanding = most_ahead = 0
    for expected, value in enumerate(itertools.islice(results, 5000)):
        assert value == expected
        most_outstanding = max(most_outstanding, executor._outstanding)
        most_ahead = max(most_ahead, pulled - expected)
    results.close()
    # The design's bounds: tasks, twice what the members may have in flight at most; items
    # taken from the iterable before their results were consumed, four chunks per task thread
    # (two in flight, two queued here) of the largest chunk size, and the chunk being read.
    threads = executor.task_threads()
    assert most_outstanding <= 2 * threads * grid.compute.dispatch._MAX_CREDIT
    assert most_ahead <= (4 * threads + 1) * grid.compute.mapping._MAX_CHUNK


# -- exceptions -------------------------------------------------------------------------------------------------


def test_remote_exception_keeps_its_type_and_traceback(executor):
    future = executor.submit(helpers.fail_at, 3, 3)
    error = future.exception(RESULT_TIMEOUT)
    assert type(error) is ValueError
    assert str(error) == "item 3 is bad"
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "in fail_at" in error.__cause__.text
    assert "ValueError: item 3 is bad" in error.__cause__.text
    with pytest.raises(ValueError, match="item 3 is bad"):
        future.result()


def test_exception_of_a_class_from_the_test_module(executor):
    error = executor.submit(raise_custom, "custom failure").exception(RESULT_TIMEOUT)
    assert type(error) is CustomError
    assert str(error) == "custom failure"
    assert "raise_custom" in error.__cause__.text


def test_exception_that_cannot_be_unpickled_fails_the_future(executor):
    error = executor.submit(raise_needs_two, "broken").exception(RESULT_TIMEOUT)
    assert isinstance(error, grid.RemoteError)
    assert "NeedsTwoArguments" in str(error)
    assert "raise_needs_two" in error.__cause__.text


def test_result_that_cannot_be_pickled_fails_the_future(executor):
    error = executor.submit(helpers.make_lock).exception(RESULT_TIMEOUT)
    assert isinstance(error, grid.RemoteError)
    assert "cannot be pickled" in str(error)


def test_map_raises_when_a_result_cannot_be_pickled(executor):
    seen = []
    with pytest.raises(grid.RemoteError, match="cannot be pickled"):
        for value in executor.map(helpers.lock_at, range(20), itertools.repeat(12), chunksize=5):
            seen.append(value)
    assert seen == list(range(len(seen))) and 10 <= len(seen) <= 12


def test_unpicklable_argument_fails_the_future(executor):
    future = executor.submit(helpers.identity, threading.Lock())
    error = future.exception(RESULT_TIMEOUT)
    assert isinstance(error, TypeError)
    assert "lock" in str(error)
    # the function still works for later tasks on the same links
    assert [executor.submit(helpers.identity, i).result(RESULT_TIMEOUT) for i in range(4)] == [0, 1, 2, 3]


# -- waiting ----------------------------------------------------------------------------------------------------


def test_wait_and_as_completed(executor, gate):
    quick = [executor.submit(helpers.square, i) for i in range(10)]
    done, not_done = wait(quick, timeout=RESULT_TIMEOUT)
    assert done == set(quick) and not not_done
    assert sorted(f.result() for f in as_completed(quick, timeout=RESULT_TIMEOUT)) == [i * i for i in range(10)]

    slow = executor.submit(helpers.gated, gate.path, "slow")
    fast = executor.submit(helpers.identity, "fast")
    done, not_done = wait([slow, fast], timeout=RESULT_TIMEOUT, return_when=FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    gate.open()
    assert next(as_completed([slow], timeout=RESULT_TIMEOUT)).result() == "slow"


def test_results_are_not_held_back_by_a_long_task(executor, gate):
    member = executor.members()[0]
    quick = [executor.submit_to_member(member, helpers.identity, i) for i in range(3)]
    slow = executor.submit_to_member(member, helpers.gated, gate.path, "slow")
    assert [f.result(10) for f in quick] == [0, 1, 2]  # while the slow task still runs
    assert not slow.done()
    gate.open()
    assert slow.result(RESULT_TIMEOUT) == "slow"


# -- cancel ------------------------------------------------------------------------------------------------------


def test_cancel_queued_work_never_runs(executor, gate, tmp_path):
    count = saturating_count(executor)
    futures = [executor.submit(helpers.gated, gate.path, i, str(tmp_path / f"ran-{i}")) for i in range(count)]
    last = futures[-1]
    assert last.cancel() is True
    assert last.cancelled()
    gate.open()
    assert [f.result(RESULT_TIMEOUT) for f in futures[:-1]] == list(range(count - 1))
    wait_for(lambda: executor._outstanding == 0, RESULT_TIMEOUT, "cancelled work to be dropped")
    assert not (tmp_path / f"ran-{count - 1}").exists()
    with pytest.raises(concurrent.futures.CancelledError):
        last.result()


def test_work_handed_to_a_member_is_running_and_cannot_be_cancelled(executor, gate):
    futures = [executor.submit(helpers.gated, gate.path, i) for i in range(executor.capacity())]
    assert not executor._backlog  # every task went to a member
    wait_for(lambda: all(f.running() for f in futures), RESULT_TIMEOUT, "the futures to be running")
    assert futures[-1].cancel() is False  # as with ProcessPoolExecutor: running work runs to the end
    assert not futures[-1].cancelled()
    gate.open()
    assert [f.result(RESULT_TIMEOUT) for f in futures] == list(range(len(futures)))


def test_wait_and_as_completed_see_a_cancelled_future_at_once(executor, gate):
    futures = [executor.submit(helpers.gated, gate.path, i) for i in range(saturating_count(executor))]
    queued = futures[-1]
    assert not queued.running()
    waiting = threading.Thread(target=lambda: seen.append(wait([queued], timeout=RESULT_TIMEOUT)))
    seen: list = []
    waiting.start()  # a waiter that is already waiting when the cancel comes is woken too
    assert queued.cancel() is True
    waiting.join(RESULT_TIMEOUT)
    assert seen and seen[0].done == {queued} and not seen[0].not_done
    done, not_done = wait(futures, timeout=0.5, return_when=FIRST_COMPLETED)
    assert done == {queued}
    assert next(as_completed([queued], timeout=1)) is queued
    gate.open()
    assert [f.result(RESULT_TIMEOUT) for f in futures[:-1]] == list(range(len(futures) - 1))


def test_no_reference_to_arguments_or_results_stays_once_a_future_is_done(executor):
    # Freed by reference counting alone, with no cycle for the cyclic collector to find later:
    # map over an endless iterable would otherwise grow until it runs.
    gc.disable()
    try:
        argument = helpers.Payload()
        argument_ref = weakref.ref(argument)
        future = executor.submit(helpers.identity, argument)
        result = future.result(RESULT_TIMEOUT)
        assert isinstance(result, helpers.Payload) and result is not argument
        result_ref = weakref.ref(result)
        del argument, result
        assert argument_ref() is None, "a done task still holds its argument"
        del future
        assert result_ref() is None, "something besides the Future holds its result"

        chunks = list(executor.map(helpers.identity, [helpers.Payload() for _ in range(20)]))
        refs = [weakref.ref(value) for value in chunks]
        del chunks
        # The thread that completed the last chunk (the caller itself, or the reader thread) may
        # still be returning from it; with the cyclic collector off, only a reference kept for good
        # (or a cycle) outlasts the deadline.
        wait_for(lambda: all(ref() is None for ref in refs), RESULT_TIMEOUT, "map to keep no result once consumed")
    finally:
        gc.enable()


def test_cancel_queued_work_pinned_to_a_member_never_runs(executor, gate, tmp_path):
    member = executor.members()[0]
    count = executor._links[member.uuid].credit + 2
    futures = [executor.submit_to_member(member, helpers.gated, gate.path, i, str(tmp_path / f"ran-{i}"))
               for i in range(count)]
    assert futures[-1].cancel() is True
    gate.open()
    assert [f.result(RESULT_TIMEOUT) for f in futures[:-1]] == list(range(count - 1))
    wait_for(lambda: executor._outstanding == 0, RESULT_TIMEOUT, "cancelled work to be dropped")
    assert not (tmp_path / f"ran-{count - 1}").exists()


def test_closing_a_map_drops_its_queued_chunks(executor, gate, tmp_path):
    markers = [str(tmp_path / f"ran-{i}") for i in range(200)]
    gates = [str(tmp_path / "open-gate")] + [gate.path] * 199
    open(gates[0], "w").close()
    results = executor.map(helpers.slow_gated, gates, range(200), markers, chunksize=1)
    assert next(results) == 0
    # No result comes back until the gate opens: what is on a link now is all that may run.
    in_flight = sum(len(link.in_flight) for link in executor._links.values())
    results.close()
    gate.open()
    wait_for(lambda: executor._outstanding == 0, RESULT_TIMEOUT, "the closed map's work to be dropped")
    ran = sum(os.path.exists(marker) for marker in markers)
    assert os.path.exists(markers[0])
    assert ran <= 1 + in_flight < 200  # the first item, and at most what was already on the members


# -- placement ---------------------------------------------------------------------------------------------------


def test_submit_to_member_runs_there(executor):
    members = executor.members()
    assert len(members) == 2
    for member in members:
        assert executor.submit_to_member(member, helpers.member_uuid).result(RESULT_TIMEOUT) == member.uuid
        assert executor.submit_to_member(member.uuid, helpers.member_uuid).result(RESULT_TIMEOUT) == member.uuid


def test_submit_to_member_of_an_unknown_member_raises(executor):
    with pytest.raises(grid.GridError, match="not a member"):
        executor.submit_to_member("127.0.0.1:1", helpers.member_uuid)


def test_submit_to_all_runs_once_on_every_member(executor):
    futures = executor.submit_to_all(helpers.member_uuid)
    assert sorted(m.uuid for m in futures) == sorted(m.uuid for m in executor.members())
    assert {m.uuid: f.result(RESULT_TIMEOUT) for m, f in futures.items()} == {m.uuid: m.uuid for m in futures}


def test_submit_uses_every_member(executor, gate):
    futures = [executor.submit(helpers.gated, gate.path, i) for i in range(executor.capacity())]
    assert len(executor._links) == 2
    assert all(link.in_flight for link in executor._links.values())
    gate.open()
    assert [f.result(RESULT_TIMEOUT) for f in futures] == list(range(len(futures)))


# -- what travels ----------------------------------------------------------------------------------------------


def test_lambdas_and_closures_travel(executor):
    offset = 10

    def shifted(x):
        return module_level_double(x) + offset

    assert executor.submit(lambda x: x + offset, 1).result(RESULT_TIMEOUT) == 11
    assert executor.submit(shifted, 1).result(RESULT_TIMEOUT) == 12
    assert list(executor.map(lambda x, y: x * y + offset, range(5), range(5))) == [10, 11, 14, 19, 26]
    assert list(executor.map(shifted, range(3), chunksize=1)) == [10, 12, 14]


def test_large_bytes_round_trip(executor):
    data = os.urandom(5 * 1024 * 1024)
    assert executor.submit(helpers.identity, data).result(RESULT_TIMEOUT) == data
    array = bytearray(data[: 1024 * 1024])
    echoed = executor.submit(helpers.identity, array).result(RESULT_TIMEOUT)
    assert type(echoed) is bytearray and echoed == array
    assert list(executor.map(len, [data, data[:100], b""])) == [len(data), 100, 0]


@pytest.mark.parametrize("size", [16, 1024 * 1024])
def test_memoryview_argument(executor, size):
    data = os.urandom(size)
    _, length, head, tail = executor.submit(helpers.describe_buffer, memoryview(data)).result(RESULT_TIMEOUT)
    assert (length, head, tail) == (size, data[:4], data[-4:])


# -- initializer ---------------------------------------------------------------------------------------------------


def test_initializer_runs_on_every_member_before_its_tasks(backend):
    token = uuid.uuid4().hex
    executor = backend.new_executor(initializer=helpers.initialize, initargs=(token,))
    try:
        futures = executor.submit_to_all(helpers.initialized_token)
        assert len(futures) == 2
        assert [f.result(RESULT_TIMEOUT) for f in futures.values()] == [token, token]
        assert {executor.submit(helpers.initialized_token).result(RESULT_TIMEOUT) for _ in range(10)} == {token}
    finally:
        backend.close(executor)


def test_failing_initializer_breaks_the_executor(backend):
    executor = backend.new_executor(initializer=helpers.fail_to_initialize)
    try:
        error = executor.submit(helpers.square, 3).exception(RESULT_TIMEOUT)
        assert isinstance(error, BrokenExecutor)
        assert "initializer failed on purpose" in str(error)
        assert "fail_to_initialize" in error.__cause__.text
        with pytest.raises(BrokenExecutor):
            list(executor.map(helpers.square, range(10)))
    finally:
        backend.close(executor)


# -- shutdown ---------------------------------------------------------------------------------------------------------


def test_shutdown_wait_true_waits_for_submitted_work(backend):
    executor = backend.new_executor()
    try:
        futures = [executor.submit(helpers.simulated_work, i, 0.05) for i in range(6)]
        executor.shutdown(wait=True)
        assert all(f.done() for f in futures)
        assert [f.result() for f in futures] == list(range(6))
        with pytest.raises(RuntimeError, match="after shutdown"):
            executor.submit(helpers.square, 1)
        with pytest.raises(RuntimeError, match="after shutdown"):
            executor.map(helpers.square, range(3))
    finally:
        backend.close(executor)


def test_shutdown_without_wait_returns_at_once_and_work_completes(backend, gate):
    executor = backend.new_executor()
    try:
        futures = [executor.submit(helpers.gated, gate.path, i) for i in range(saturating_count(executor))]
        started = time.monotonic()
        executor.shutdown(wait=False)
        assert time.monotonic() - started < 2
        assert not any(f.done() for f in futures)
        with pytest.raises(RuntimeError):
            executor.submit(helpers.square, 1)
        gate.open()
        assert [f.result(RESULT_TIMEOUT) for f in futures] == list(range(len(futures)))
    finally:
        backend.close(executor)


def test_shutdown_cancel_futures_cancels_only_work_not_started(backend, gate, tmp_path):
    executor = backend.new_executor()
    try:
        count = saturating_count(executor)
        futures = [executor.submit(helpers.gated, gate.path, i, str(tmp_path / f"ran-{i}")) for i in range(count)]
        wait_for(lambda: sum(f.running() for f in futures) == count - 4, RESULT_TIMEOUT, "the work to be handed out")
        executor.shutdown(wait=False, cancel_futures=True)
        assert all(f.cancelled() for f in futures[-4:])  # the backlog, never sent
        done, _ = wait(futures[-4:], timeout=1)  # seen as done at once
        assert done == set(futures[-4:])
        gate.open()
        executor.shutdown(wait=True)
        assert [f.result() for f in futures[:-4]] == list(range(count - 4)), "running work runs to the end"
        for i in range(count - 4, count):
            assert not (tmp_path / f"ran-{i}").exists()
    finally:
        backend.close(executor)


def test_a_map_dropped_before_its_first_result_still_runs_every_item(executor, tmp_path):
    markers = [str(tmp_path / f"ran-{i}") for i in range(60)]
    open_gate = str(tmp_path / "open")
    open(open_gate, "w").close()
    executor.map(helpers.gated, [open_gate] * 60, range(60), markers, chunksize=1)  # not kept, never read
    gc.collect()
    # As with the stdlib's map, which submits every item at once: all of them run.
    wait_for(lambda: all(os.path.exists(marker) for marker in markers), RESULT_TIMEOUT, "every item to run")


def test_the_results_of_a_map_can_be_read_after_shutdown(backend):
    with backend.new_executor() as executor:
        results = executor.map(helpers.square, range(3000), chunksize=7)
        unordered = executor.map_unordered(helpers.square, range(500), chunksize=3)
    try:
        assert list(results) == [x * x for x in range(3000)]  # the with block waited for all of it
        assert sorted(unordered) == [x * x for x in range(500)]
    finally:
        backend.close(executor)


def test_shutdown_cancel_futures_stops_open_maps(backend, gate, tmp_path):
    executor = backend.new_executor()
    try:
        markers = [str(tmp_path / f"ran-{i}") for i in range(300)]
        results = executor.map(helpers.slow_gated, [gate.path] * 300, range(300), markers, chunksize=1)
        executor.shutdown(wait=False, cancel_futures=True)
        gate.open()
        executor.shutdown(wait=True)
        assert sum(os.path.exists(marker) for marker in markers) < 300
        with pytest.raises(concurrent.futures.CancelledError):
            list(results)
    finally:
        backend.close(executor)


@pytest.mark.parametrize("ending", ["exit", "shutdown(wait=False)", "map dropped, then exit"])
def test_work_given_before_the_program_ends_runs_to_the_end(tmp_path, ending):
    script = textwrap.dedent(f"""
        import os, sys, time, grid
        def work(i, folder):
            end = time.perf_counter() + 0.01  # a little work, so that some is still queued at the end
            while time.perf_counter() < end:
                pass
            open(os.path.join(folder, f"ran-{{i}}"), "w").close()
        executor = grid.GridExecutor(2)
        futures = [executor.submit(work, i, sys.argv[1]) for i in range(10)]
        results = executor.map(work, range(10, 80), [sys.argv[1]] * 70, chunksize=2)
        if {ending!r} == "shutdown(wait=False)":
            executor.shutdown(wait=False)
        if {ending!r} == "map dropped, then exit":
            del results
    """)
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "GRID"})
    assert done.returncode == 0, done.stderr
    assert sorted(int(path.name.split("-")[1]) for path in out.iterdir()) == list(range(80))


def test_context_manager_waits_and_shuts_down(backend):
    with backend.new_executor() as executor:
        futures = [executor.submit(helpers.simulated_work, i, 0.02) for i in range(4)]
    try:
        assert all(f.done() for f in futures)
        assert [f.result() for f in futures] == [0, 1, 2, 3]
        with pytest.raises(RuntimeError):
            executor.submit(helpers.square, 1)
    finally:
        backend.close(executor)


# -- member death -----------------------------------------------------------------------------------------------------


def test_task_that_kills_its_member_fails_with_worker_crashed(backend, local_cluster):
    if backend.name == "embedded":
        executor = backend.new_executor(max_retries=1)
    else:  # it kills both members: not the shared cluster
        cluster = local_cluster(2)
        executor = grid.GridExecutor(cluster=grid.connect(cluster.config()), max_retries=1)
    try:
        error = executor.submit(helpers.crash, 13).exception(RESULT_TIMEOUT)
        assert isinstance(error, grid.WorkerCrashed)
        assert isinstance(error, BrokenExecutor)
        assert "crash" in str(error)
        assert "was lost while running it" in str(error)
        if backend.name == "embedded":
            assert "exited with code 13" in str(error)
            assert "log ends with" in str(error)
    finally:
        backend.close(executor)


@pytest.mark.slow
def test_map_survives_a_member_killed_midway(local_cluster):
    cluster = local_cluster(2)
    executor = grid.GridExecutor(cluster=grid.connect(cluster.config()))
    try:
        results = executor.map(helpers.simulated_work, range(10_000), itertools.repeat(0.0005), chunksize=10)
        collected = list(itertools.islice(results, 2000))
        assert any(link.in_flight for link in executor._links.values())
        cluster.kill(0)
        collected.extend(results)
        assert collected == list(range(10_000))
    finally:
        Backend.close(executor)


# -- task output ------------------------------------------------------------------------------------------------------


def test_what_a_task_prints_reaches_the_callers_streams_line_by_line(tmp_path, gate, capsys):
    backend = Backend("embedded", tmp_path)
    executor = backend.new_executor()
    try:
        seen = {"out": [], "err": []}

        def printed(text, stream):
            captured = capsys.readouterr()
            seen["out"].append(captured.out)
            seen["err"].append(captured.err)
            return text in "".join(seen[stream])

        for stream, name in (("out", "stdout"), ("err", "stderr")):
            marker = f"printed by a task to {name} {uuid.uuid4().hex}"
            future = executor.submit(helpers.say, marker, name, gate.path)
            wait_for(lambda: printed(marker, stream), RESULT_TIMEOUT, f"the task's line on the caller's {name}")
            assert not future.done()  # the line came while the task still ran
            gate.open()
            assert future.result(RESULT_TIMEOUT) == marker
            assert "".join(seen[stream]).count(marker) == 1
            os.remove(gate.path)
    finally:
        backend.close(executor)


# -- fmap / ufmap on the default executor -----------------------------------------------------------------------------


def test_fmap_and_ufmap_on_the_default_executor(tmp_path):
    script = textwrap.dedent("""
        import grid
        offset = 1
        print(list(grid.fmap(lambda x: x * x + offset, range(50))))
        print(sorted(grid.ufmap(lambda x: x * x + offset, range(50))))
        print(list(grid.fmap(lambda x, y: x + y, range(5), range(10, 13), chunksize=1)))
    """)
    environment = {k: v for k, v in os.environ.items() if k not in ("GRID", "GRID_SECRET")}
    environment["HOME"] = str(tmp_path)  # no ~/.grid/grid.toml: the embedded default
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    expected = [x * x + 1 for x in range(50)]
    assert lines == [str(expected), str(expected), str([10, 12, 14])]


def test_with_nothing_configured_the_default_cluster_is_the_embedded_one_fmap_uses(tmp_path):
    script = textwrap.dedent("""
        import grid
        cluster = grid.cluster()
        print(len(cluster.members()))
        print(cluster is grid.default_executor().cluster is grid.cluster())
        print(sorted(grid.run_all(lambda: 7).values()))
        print(list(grid.fmap(lambda x: -x, range(3))))
    """)
    environment = {k: v for k, v in os.environ.items() if k not in ("GRID", "GRID_SECRET")}
    environment["HOME"] = str(tmp_path)  # no ~/.grid/grid.toml: nothing configured
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    cores = os.cpu_count() or 1
    assert completed.stdout.splitlines() == [str(cores), "True", str([7] * cores), "[0, -1, -2]"]


def test_an_argument_that_cannot_be_unpickled_fails_instead_of_hanging(backend):
    executor = backend.new_executor(max_retries=1)
    try:
        future = executor.submit(helpers.identity, helpers.Undecodable())
        # The member unpickles a task's arguments on the task thread: only that task fails, saying why.
        with pytest.raises(grid.RemoteError, match="arguments cannot be unpickled here.*cannot be unpickled"):
            future.result(timeout=30)
        assert executor.submit(helpers.identity, 5).result(timeout=30) == 5, "the member goes on"
    finally:
        backend.close(executor)


def test_a_result_the_caller_cannot_unpickle_fails_only_its_own_task(backend):
    """It used to make the whole "results" frame undecodable: the link closed, the task ran again on
    every link, and the caller hung."""
    executor = backend.new_executor(max_retries=1)
    try:
        futures = [executor.submit(helpers.make_undecodable, value) for value in (1, None, 3)]
        with pytest.raises(grid.RemoteError, match="result of task .* cannot be unpickled here.*cannot be unpickled"):
            futures[1].result(timeout=RESULT_TIMEOUT)
        assert [futures[0].result(RESULT_TIMEOUT), futures[2].result(RESULT_TIMEOUT)] == [1, 3]
        results = executor.map(helpers.make_undecodable, [5, None, 7], chunksize=1)
        assert next(results) == 5
        with pytest.raises(grid.RemoteError, match="cannot be unpickled here"):
            next(results)
        assert list(executor.map(helpers.identity, range(50))) == list(range(50)), "the links stayed up"
    finally:
        backend.close(executor)


def test_done_callbacks_never_run_on_the_io_thread_and_may_wait_for_other_results(executor, gate):
    """A callback ran on the executor's IO thread: a slow one held up every other result, and one
    that waited for another result deadlocked it."""
    release = threading.Event()
    ran_on, inner = [], []

    def callback(done):
        ran_on.append(threading.current_thread().name)
        inner.append(executor.submit(helpers.identity, 7).result(timeout=RESULT_TIMEOUT))
        release.wait(RESULT_TIMEOUT)

    first = executor.submit(helpers.gated, gate.path, "first")
    first.add_done_callback(callback)
    gate.open()
    try:
        wait_for(lambda: inner, RESULT_TIMEOUT, "the callback's own result")
        assert not ran_on[0].startswith("grid-io"), ran_on
        assert inner == [7]
        # The callback still blocks: other results, waited for by any means, still come.
        assert executor.submit(helpers.square, 4).result(timeout=RESULT_TIMEOUT) == 16
        later = [executor.submit(helpers.square, x) for x in range(5)]
        done, _ = wait(later, timeout=RESULT_TIMEOUT)
        assert len(done) == 5 and sorted(f.result() for f in later) == [0, 1, 4, 9, 16]
    finally:
        release.set()
    assert first.result(RESULT_TIMEOUT) == "first"


def test_a_caller_reads_its_own_results_without_the_executors_io_thread(executor):
    """The executor's links are lent to the callers waiting for results (completions.py): a reply
    wakes its caller directly, so results come while the executor's IO thread is held up."""
    held, holding = threading.Event(), threading.Event()

    def hold_io_thread():
        holding.set()
        held.wait(RESULT_TIMEOUT)

    executor._transport.call_soon(hold_io_thread)
    try:
        assert holding.wait(RESULT_TIMEOUT)
        # (within a third of the hold: a result that needed the IO thread would time out)
        assert [executor.submit(helpers.square, n).result(RESULT_TIMEOUT / 3) for n in range(20)] == \
            [n * n for n in range(20)]
    finally:
        held.set()


def test_embedded_members_leave_when_their_parent_dies(tmp_path):
    script = (
        "import os, grid\n"
        "executor = grid.GridExecutor(2)\n"
        "print(' '.join(str(m.pid) for m in executor.members()), flush=True)\n"
        "os._exit(0)\n"
    )
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "GRID"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=dict(env, TMPDIR=str(temp)))
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2, done.stderr
    [left] = [path for path in temp.iterdir() if path.name.startswith("grid-embedded-")]

    def gone(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(lambda: all(gone(pid) for pid in pids), 15, "the orphaned members to exit")
    # The parent could not remove its folder; the next embedded cluster made here sweeps it.
    assert left.is_dir()
    assert [path for path in temp.iterdir() if path.name.startswith("grid-member-")] == [], "members clean up"
    assert grid.net.folders.sweep_abandoned("grid-embedded-", directory=str(temp)) == [str(left)]
    assert not left.exists()


def test_a_script_using_the_default_cluster_exits(local_cluster, tmp_path):
    cluster = local_cluster(1)
    env = dict(os.environ, GRID=cluster.write_client_config())
    done = subprocess.run([sys.executable, "-c", "import grid; print(len(grid.cluster().members()))"],
                          capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


def test_a_script_that_forgets_to_shut_its_executor_down_still_exits(tmp_path):
    script = "import grid\nexecutor = grid.GridExecutor(1)\nprint(executor.submit(sum, [1, 2]).result())\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "GRID"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"


# -- map_reduce: mapped and reduced on the members --------------------------------------------------------------


def test_map_reduce_equals_a_local_reduce_and_keeps_the_order(executor):
    import functools
    import operator

    assert executor.map_reduce(helpers.square, operator.add, range(100_000)) == sum(x * x for x in range(100_000))
    words = [f"w{n}" for n in range(5_000)]  # (concatenation: associative, not commutative)
    assert executor.map_reduce(str.upper, operator.add, iter(words), chunksize=7) == "".join(words).upper()
    assert executor.map_reduce(lambda x: {x % 10}, operator.or_, range(1000), initial={99}) == set(range(10)) | {99}
    assert executor.map_reduce(helpers.square, max, [3, 1, 2]) == functools.reduce(max, map(helpers.square, [3, 1, 2]))
    assert executor.map_reduce(helpers.square, operator.add, [], initial=5) == 5
    with pytest.raises(TypeError, match="empty iterable with no initial value"):
        executor.map_reduce(helpers.square, operator.add, [])


def test_map_reduce_combines_many_partials_by_a_tree_and_sends_only_partials_back(executor, monkeypatch):
    """1000 chunks: 1000 partials, then 63, then 4, then 1, each level reduced on the members; no mapped
    item comes back (the map function's values are large, the partials small)."""
    import operator

    from grid.compute import reduce

    levels = []
    real_map = type(executor).map

    def watched(self, fn, *iterables, **options):
        results = list(real_map(self, fn, *iterables, **options))
        levels.append((fn.func.__name__, len(results), max(len(repr(r)) for r in results)))
        return iter(results)

    monkeypatch.setattr(type(executor), "map", watched)
    total = executor.map_reduce(lambda x: [x] * 100, lambda a, b: [sum(a) + sum(b)], range(10_000), chunksize=10)
    assert total == [100 * sum(range(10_000))]
    assert [(name, count) for name, count, _ in levels] == [
        ("map_and_reduce", 1000), ("reduce_partials", 63), ("reduce_partials", 4), ("reduce_partials", 1)]
    assert all(longest < 40 for _, _, longest in levels), "a mapped item (100 numbers) came back"
    assert reduce.FAN_IN == 16
    with pytest.raises(ValueError, match="chunksize"):
        executor.map_reduce(helpers.square, operator.add, range(3), chunksize=0)


# -- progress=True: a bar on stderr ------------------------------------------------------------------------------


@pytest.mark.parametrize("bar", ["tqdm", "plain"])
def test_map_with_progress_draws_a_bar_for_sized_and_unsized_inputs(executor, capfd, monkeypatch, bar):
    if bar == "plain":
        monkeypatch.setitem(sys.modules, "tqdm", None)  # (not installed: the standard library's line)
    assert list(executor.map(helpers.square, range(200), progress=True)) == [x * x for x in range(200)]
    drawn = capfd.readouterr().err
    assert "200/200" in drawn
    assert sorted(executor.map_unordered(helpers.square, (x for x in range(30)), progress=True)) == \
        sorted(x * x for x in range(30))
    drawn = capfd.readouterr().err
    assert "30" in drawn and "/30" not in drawn, "an unsized input shows the count so far, of no total"
    assert list(executor.map(helpers.square, [], progress=True)) == []
