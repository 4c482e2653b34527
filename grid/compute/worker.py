"""The member's half of the executor: run the tasks that executors send here.

    executor link --"tasks"--> IO thread: forget ids, load     task threads ("grid-task-N")
                               functions, queue each task -----> run fn(*args) / a chunk
                               with its function
    executor link <--"results"-- sent straight from the task thread, batched while
                                 more tasks are queued behind it

Each executor link has its own state: the functions it sent (by id, so a function
travels once per link), its initializer (run before any of its tasks), and the
tasks it cancelled before they started. A "tasks" frame opens with the ids the
executor dropped from its cache: they are forgotten here. A task takes its function
when it arrives, so a task queued before its function was forgotten still runs.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import traceback

from ..errors import BrokenGrid, GridError, RemoteError
from ..net import messaging, serialize
from .protocol import CALL, CANCELLED, CHUNK1, FAILED, OK, UNSENDABLE

log = logging.getLogger("grid.worker")

_QUICK_SECONDS = 0.0005  # a function that always ran faster than this may run on the IO thread
_QUICK_RUNS = 5  # ... once it has done so this many times
_INLINE_BATCH = 4  # at most this many tasks of one frame run on the IO thread
_RESULT_BATCH = 256  # results per frame at most
_RESULT_DELAY = 0.005  # seconds a finished result may wait for others to share its frame


_current_member = None


def current_member():
    """The ``Member`` this code runs on (inside a task on a member), or None in a client."""
    return _current_member


def set_current_member(member) -> None:
    """Name the member this process is (its ``Peer`` does, on start and close)."""
    global _current_member
    _current_member = member


class _LoadedFunction:
    """A function an executor link sent, unpickled, and how fast it runs here.

    ``quick``: it always ran in under ``_QUICK_SECONDS`` (at least ``_QUICK_RUNS`` times),
    so it may run on the IO thread. One slow run disqualifies it for good, so a long task
    never holds up heartbeats. Its timings live here, not in a table by id, so forgetting
    the function forgets them too (a task thread timing it later updates only this object).
    """

    __slots__ = ("fn", "runs", "quick")

    def __init__(self, fn):
        self.fn = fn
        self.runs = 0  # quick runs so far; -1: it was slow once
        self.quick = False

    def timed(self, seconds: float) -> None:
        runs = self.runs
        if runs < 0:
            return
        if seconds > _QUICK_SECONDS:
            self.runs = -1
            self.quick = False
        elif runs + 1 >= _QUICK_RUNS:
            self.runs = _QUICK_RUNS
            self.quick = True
        else:
            self.runs = runs + 1


_NEVER_SENT = _LoadedFunction(None)  # looked up in place of an id the link never sent: not quick


class _LinkState:
    """What one executor link has told this member: ``functions`` holds what it sent and has
    not told us to forget (the executor keeps that bounded)."""

    __slots__ = ("functions", "cancelled", "init_done", "init_error", "held", "lock", "pending_results")

    def __init__(self):
        self.functions: dict[int, _LoadedFunction] = {}
        self.cancelled: set[int] = set()
        self.init_done = True
        self.init_error = None  # the packed error of a failed initializer: every task fails with it
        self.held: list = []  # (task, function) that arrived before the initializer finished
        self.lock = threading.Lock()
        self.pending_results: list = []


class TaskRunner:
    """Runs executor tasks on ``workers`` threads of this member.

    With ``hold=True`` it takes no work (tasks and initializers are kept, in order)
    until ``release()``: a member that joins replays the patch log first.
    """

    def __init__(self, router, *, workers: int, hold: bool = False):
        self.workers = workers
        self._held_frames: list | None = [] if hold else None  # (handler, conn, body) until release()
        self.tasks_done = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"grid-task-{index}") for index in range(workers)]
        router.register("tasks", self._on_tasks)
        router.register("cancel", self._on_cancel)
        router.register("init", self._on_init)
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop the task threads after the task each is running; join them."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def release(self, call_soon) -> None:
        """Start taking work, beginning with what was held (``call_soon``: the IO thread's)."""
        call_soon(self._release)

    def _release(self) -> None:
        held, self._held_frames = self._held_frames, None
        for handler, conn, body in held or ():  # on the IO thread, so no newer frame overtakes these
            handler(conn, body)

    def _hold(self, handler, conn, body) -> bool:
        if self._held_frames is None:
            return False
        self._held_frames.append((handler, conn, body))
        return True

    # -- IO thread ------------------------------------------------------------------------------

    @staticmethod
    def _state(conn) -> _LinkState:
        state = conn.attachment
        if not isinstance(state, _LinkState):
            state = conn.attachment = _LinkState()
        return state

    def _on_tasks(self, conn, body) -> None:
        if self._held_frames is not None and self._hold(self._on_tasks, conn, body):
            return
        forget, functions, tasks = body
        state = self._state(conn)
        table = state.functions
        for function_id in forget:  # before this frame's functions: it may send one of them again
            table.pop(function_id, None)
        for function_id, pickled in functions:
            try:
                table[function_id] = _LoadedFunction(serialize.loads(pickled))
            except Exception as exc:
                table[function_id] = _LoadedFunction(_Unloadable(exc))
        # Each task takes its function now: a later frame may forget it before the task runs.
        function_of = table.get  # None: never sent, which _execute reports
        if not state.init_done:
            with state.lock:
                if not state.init_done:
                    state.held.extend([(task, function_of(task[1])) for task in tasks])
                    return
        if len(tasks) <= _INLINE_BATCH and self._queue.empty() and all(
                function_of(task[1], _NEVER_SENT).quick and (task[2] == CALL or len(task[3]) == 1)
                for task in tasks):
            # Known-quick functions with nothing queued: run them here, on the IO thread,
            # and save the hand-over to a task thread (tens of microseconds a task).
            for task in tasks:
                state.pending_results.append(self._execute(state, task, function_of(task[1])))
            self.tasks_done += len(tasks)
            self._flush(conn, state)
            return
        put = self._queue.put
        for task in tasks:
            put((conn, state, task, function_of(task[1])))

    def _on_cancel(self, conn, task_ids) -> None:
        self._state(conn).cancelled.update(task_ids)

    def _on_init(self, conn, pickled) -> None:
        if self._held_frames is not None and self._hold(self._on_init, conn, pickled):
            return
        state = self._state(conn)
        state.init_done = False
        self._queue.put((conn, state, ("init", pickled), None))

    # -- task threads -----------------------------------------------------------------------------

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        dirty: dict[int, tuple] = {}  # links with results not yet sent, by id(state)
        while True:
            try:
                item = get_nowait()
            except queue.Empty:
                for conn, state, _ in dirty.values():  # idle: send everything now
                    self._flush(conn, state)
                dirty.clear()
                item = get()
            else:
                for key, (conn, state, first) in dirty.items():
                    if first is not None:  # the next task may run long: the IO thread sends these in time
                        conn.driver.call_later(_RESULT_DELAY, self._flush, conn, state)
                        dirty[key] = (conn, state, None)
            if item is None:
                for conn, state, _ in dirty.values():
                    self._flush(conn, state)
                return
            conn, state, task, function = item
            if task[0] == "init":
                self._run_initializer(conn, state, task[1])
                continue
            result = self._execute(state, task, function)
            with state.lock:  # another thread may be taking the list in _flush
                state.pending_results.append(result)
                waiting = len(state.pending_results)
            self.tasks_done += 1
            # Batch results while more work is queued behind this task, within a latency bound
            # (first is None once a timer on the IO thread guarantees that bound).
            now = time.perf_counter()
            first = dirty.setdefault(id(state), (conn, state, now))[2]
            if waiting >= _RESULT_BATCH or (first is not None and now - first > _RESULT_DELAY):
                self._flush(conn, state)
                del dirty[id(state)]

    def _execute(self, state: _LinkState, task, function: _LoadedFunction | None) -> tuple:
        task_id, function_id, kind, args, kwargs = task
        if task_id in state.cancelled:
            state.cancelled.discard(task_id)
            return (task_id, CANCELLED, None, 0.0)
        if state.init_error is not None:
            return (task_id, FAILED, state.init_error if kind == CALL else ([], state.init_error), 0.0)
        if function is None:
            error = serialize.pack_error(GridError(f"function {function_id} was never sent on this link, or was forgotten "
                                          "before this task arrived (a grid bug)"))
            return (task_id, FAILED, error if kind == CALL else ([], error), 0.0)
        fn = function.fn
        started = time.perf_counter()
        if kind == CALL:
            try:
                value = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: B036 - the caller gets every failure
                if isinstance(exc, (KeyboardInterrupt, SystemExit)) and not isinstance(fn, _Unloadable):
                    exc = RemoteError(f"task raised {type(exc).__name__}: {exc}")
                return (task_id, FAILED, serialize.pack_error(exc), time.perf_counter() - started)
            seconds = time.perf_counter() - started
            function.timed(seconds)
            return (task_id, OK, serialize.wrap_buffers((value,))[0], seconds)
        values = []
        try:  # list.extend keeps what it appended before an exception: the results up to the failure
            values.extend(map(fn, args) if kind == CHUNK1 else itertools.starmap(fn, args))
        except BaseException as exc:  # noqa: B036
            return (task_id, FAILED, (values, serialize.pack_error(exc)), time.perf_counter() - started)
        seconds = time.perf_counter() - started
        if len(values) == 1:
            function.timed(seconds)
        return (task_id, OK, serialize.wrap_buffers(values), seconds)

    def _flush(self, conn, state: _LinkState) -> None:
        with state.lock:
            results, state.pending_results = state.pending_results, []
        if not results:
            return
        try:
            parts = serialize.dumps_parts(("results", results))
        except Exception:
            parts = serialize.dumps_parts(("results", [_sendable(result) for result in results]))
        try:
            conn.send_frame(messaging.Kind.MESSAGE, parts if len(parts) > 1 else parts[0])
        except GridError as exc:
            log.info("results for %d tasks could not be sent (%s); the executor will retry them", len(results), exc)

    def _run_initializer(self, conn, state: _LinkState, pickled) -> None:
        try:
            fn, args = serialize.loads(pickled)
            fn(*args)
        except BaseException as exc:  # noqa: B036
            log.error("executor initializer failed: %s", exc)
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            broken = BrokenGrid(f"the executor's initializer failed on member {current_member()} "
                                f"({type(exc).__name__}: {exc}), so none of its tasks run there; fix the "
                                "initializer (its traceback is the __cause__) and make a new executor")
            state.init_error = (serialize.dumps(broken), text)
        with state.lock:
            held, state.held = state.held, []
            state.init_done = True
        for task, function in held:
            self._queue.put((conn, state, task, function))


class _Unloadable:
    """Stands in for a function that could not be unpickled here; calling it says why."""

    def __init__(self, error: BaseException):
        self.error = error

    def __call__(self, *args, **kwargs):
        raise RemoteError(f"this member cannot load the function: {type(self.error).__name__}: {self.error}; "
                          "is its module importable on every member? (grid.deploy ships it)") from self.error


def _sendable(result: tuple) -> tuple:
    """``result``, or if its value cannot be pickled, an UNSENDABLE result with an error that says so."""
    task_id, status, value, seconds = result
    try:
        serialize.dumps(value)
        return result
    except Exception as exc:
        if status == FAILED and isinstance(value[0], list):  # a chunk's values before its failure
            return (task_id, UNSENDABLE, value[1], seconds)
        error = RemoteError(f"the task's result ({type(value).__name__}) cannot be pickled: {exc}; "
                            "return plain data (or objects that pickle) from tasks")
        return (task_id, UNSENDABLE, serialize.pack_error(error), seconds)
