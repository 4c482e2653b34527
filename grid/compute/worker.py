"""The member's half of the executor: run the tasks that executors send here.

    executor link --"tasks"--> an idle task thread, woken     the task threads ("grid-task-N")
                               by the kernel (it reads the    unpickle a function on first
                               link itself): forget ids,      use, run fn(*args) / a chunk
                               keep new functions (pickled),  the thread that read the frame
                               check and queue each task -->  runs its first task itself
    executor link <--"results"-- sent straight from the task thread, batched while
                                 more tasks are queued behind it

Executor links are read by the task threads, not the IO thread. Of ``workers + 1``
threads at most ``workers`` run tasks; the others wait together in one epoll over every
executor link (``net.lending.LinkReader``), so a frame wakes one of them and nothing
else. That thread checks and queues the frame's tasks and runs the first itself
(``_Crew``). Handing each task from the IO thread to a task thread cost two wake-ups in
a row (the thread, then the GIL the IO thread held until it was back in its own select).
Only "tasks", "cancel" and "init" are handled on the thread that read them; any other
message on these links runs on the IO thread. A link is lent when its first "tasks"
frame is handled (on the IO thread); TLS links are never lent and stay the IO thread's,
whose "tasks" then signal a waiting task thread.

The IO thread never runs user code, however quick: it only checks and queues, so
heartbeats and handshakes never wait on a task (unpickling a function may import user
modules, so that happens on a task thread too). A malformed task fails with an error
saying what is wrong with it; a frame none of whose tasks can be answered closes the
link, after a goodbye. A task thread outlives anything a task or a frame does. With
``task_processes`` each running task thread uses one of the child processes
(``taskproc.py``), so a task that kills its process does not kill the member.

Each executor link has its own state: the functions it sent (by id, so a function
travels once per link), its initializer (run before any of its tasks), and the
tasks it cancelled before they started. A "tasks" frame opens with the ids the
executor dropped from its cache: they are forgotten here. A task takes its function
when it arrives, so a task queued before its function was forgotten still runs.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import traceback

from ..errors import BrokenGrid, GridError, RemoteError
from ..net import messaging, serialize
from ..net.lending import LinkReader
from .protocol import (CALL, CANCELLED, CHUNK, CHUNK1, FAILED, FRAME_BYTES, NO_VALUES, OK, UNSENDABLE, pack_value,
                       packed_size, unpack_arguments)

_KINDS = (CALL, CHUNK, CHUNK1)

log = logging.getLogger("grid.worker")

_RESULT_BATCH = 256  # results per frame at most
_RESULT_DELAY = 0.005  # seconds a finished result may wait for others to share its frame


_current_member = None
_serials = itertools.count(1)  # of loaded functions and link states, unique in this process


def current_member():
    """The ``Member`` this code runs on (inside a task on a member), or None in a client."""
    return _current_member


def set_current_member(member) -> None:
    """Name the member this process is (its ``Peer`` does, on start and close)."""
    global _current_member
    _current_member = member


class _LoadedFunction:
    """A function an executor link sent: pickled on arrival, unpickled by the first task thread
    that runs it (unpickling may import user modules: never on the IO thread)."""

    __slots__ = ("pickled", "serial", "_fn", "_lock")

    def __init__(self, pickled):
        self.pickled = pickled
        self.serial = next(_serials)  # names it to a task process (ids are per link, serials per member)
        self._fn = None
        self._lock = threading.Lock()

    def load(self):
        fn = self._fn
        if fn is None:
            with self._lock:  # two task threads may take the same function's first tasks
                fn = self._fn
                if fn is None:
                    fn = self._fn = load_function(self.pickled)
                    self.pickled = None
        return fn


class _LinkState:
    """What one executor link has told this member: ``functions`` holds what it sent and has
    not told us to forget (the executor keeps that bounded)."""

    __slots__ = ("functions", "cancelled", "init_done", "init_error", "init_pickled", "held", "lock",
                 "pending_results", "pending_bytes", "serial", "lent")

    def __init__(self):
        self.serial = next(_serials)
        self.init_pickled = None  # with task processes: the initializer each process runs first
        self.functions: dict[int, _LoadedFunction] = {}
        self.cancelled: set[int] = set()
        self.init_done = True
        self.init_error = None  # the packed error of a failed initializer: every task fails with it
        self.held: list = []  # (task, function) that arrived before the initializer finished
        self.lock = threading.Lock()
        self.pending_results: list = []
        self.pending_bytes = 0  # the size of their values
        self.lent = False  # read by the task threads (see _Crew)


class _Crew:
    """The task threads' queue of work: ``workers`` items run at once at most.

    The threads that run nothing wait in the link reader (``net.lending.LinkReader``),
    where a frame on an executor link wakes one of them, which handles it and takes the
    work it brought. Work queued otherwise (by the IO thread) signals a waiting thread, and
    a thread that takes work while more is queued signals the next. ``slots`` name what a
    running thread uses (its task process), one per running thread.
    """

    def __init__(self, workers: int, signal):
        self.workers = workers
        self._signal = signal
        self._lock = threading.Lock()
        self._work: collections.deque = collections.deque()
        self._slots = list(range(workers))
        self._running = 0
        self._reading = threading.local()  # .active: this thread is handling frames it read

    def __len__(self) -> int:
        return len(self._work)

    @property
    def running(self) -> int:
        """Task threads running work now."""
        return self._running

    def put(self, item) -> None:
        """Queue work (any thread). A thread waiting in the reader is signalled for it, unless a
        task thread reading a frame put it: that thread takes it next."""
        with self._lock:
            self._work.append(item)
            wake = self._running < self.workers and not getattr(self._reading, "active", False)
        if wake:
            self._signal()

    def reading(self, active: bool) -> None:
        """This task thread starts (True) or stops handling frames it read."""
        self._reading.active = active

    def take(self, slot):
        """``(item, slot)``: the next work this thread may start, or ``(None, None)``, having let
        go of its ``slot`` (the one it holds after running something, or None)."""
        with self._lock:
            if self._work and (slot is not None or self._running < self.workers):
                if slot is None:
                    slot = self._slots.pop()
                    self._running += 1
                item = self._work.popleft()
                more = bool(self._work) and self._running < self.workers
            else:
                if slot is not None:
                    self._slots.append(slot)
                    self._running -= 1
                return None, None
        if more:
            self._signal()
        return item, slot


class TaskRunner:
    """Runs executor tasks on ``workers`` threads of this member.

    With ``hold=True`` it takes no work (tasks and initializers are kept, in order)
    until ``release()``: a member that joins replays the patch log first. Given
    ``processes`` (``taskproc.TaskProcess``es, made by the peer), ``workers`` is their
    number and each running task thread runs its tasks in one of them; they are closed
    with it. There is one thread more than ``workers``: the one reading the links.
    """

    def __init__(self, router, *, workers: int, hold: bool = False, processes=()):
        self._processes = list(processes)
        self.workers = len(self._processes) or workers
        self._held_frames: list | None = [] if hold else None  # (handler, conn, body) until release()
        self.tasks_done = 0
        self.task_seconds: collections.deque = collections.deque(maxlen=1_000)  # the last tasks' run times
        self._reader = LinkReader()
        self._crew = _Crew(self.workers, self._reader.signal)
        self._threads = [threading.Thread(target=self._run, name=f"grid-task-{index}")
                         for index in range(self.workers + 1)]
        router.register("tasks", self._on_tasks, any_thread=True)
        router.register("cancel", self._on_cancel, any_thread=True)
        router.register("init", self._on_init, any_thread=True)
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop the task threads once the tasks queued have run; join them. The links go back
        to the IO thread."""
        self._reader.stop()
        for thread in self._threads:
            thread.join()
        self._reader.close()
        for process in self._processes:
            process.close()

    @property
    def queued(self) -> int:
        return len(self._crew)

    @property
    def running(self) -> int:
        return self._crew.running

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

    # -- the thread that read the frame: the IO thread, or the leading task thread -------------------

    @staticmethod
    def _state(conn) -> _LinkState:
        state = conn.attachment
        if not isinstance(state, _LinkState):
            state = conn.attachment = _LinkState()
        return state

    def _lend(self, conn, state: _LinkState) -> None:
        """From its first tasks (once nothing is held), the task threads read this link."""
        if not state.lent:
            state.lent = True
            self._reader.lend(conn)

    def _on_tasks(self, conn, body) -> None:
        if self._held_frames is not None and self._hold(self._on_tasks, conn, body):
            return
        try:
            forget, functions, tasks = body
            forget, functions, tasks = list(forget), list(functions), list(tasks)
        except (TypeError, ValueError):
            self._refuse(conn, f"a 'tasks' body must be (forget, functions, tasks), not {messaging.shorten(body)}")
            return
        state = self._state(conn)
        self._lend(conn, state)
        table = state.functions
        for function_id in forget:  # before this frame's functions: it may send one of them again
            if isinstance(function_id, int):
                table.pop(function_id, None)
        for entry in functions:
            if type(entry) is tuple and len(entry) == 2 and isinstance(entry[0], int):
                table[entry[0]] = _LoadedFunction(entry[1])  # unpickled on a task thread, where it runs
            else:  # the tasks that use it fail with "never sent"
                log.warning("ignoring a malformed function entry %s from %r", messaging.shorten(entry), conn)
        good, failed = [], []
        for task in tasks:
            problem = _malformed(task)
            if problem is None:
                good.append(task)
            elif type(task) in (tuple, list) and task and isinstance(task[0], int):
                error = serialize.pack_error(GridError(f"malformed task from the executor: {problem}"))
                chunk = len(task) > 2 and task[2] in (CHUNK, CHUNK1)  # a chunk's failure carries its values too
                failed.append((task[0], FAILED, (NO_VALUES, error) if chunk else error, 0.0))
            else:
                self._refuse(conn, f"a task without a usable id: {problem}")
                return
        if failed:
            log.warning("%d malformed tasks from %r failed, the first: %s", len(failed), conn, messaging.shorten(tasks))
            with state.lock:
                state.pending_results.extend(failed)
            self._flush(conn, state)
        # Each task takes its function now: a later frame may forget it before the task runs.
        function_of = table.get  # None: never sent, which _execute reports
        if not state.init_done:
            with state.lock:
                if not state.init_done:
                    state.held.extend([(task, function_of(task[1])) for task in good])
                    return
        put = self._crew.put
        for task in good:
            put((conn, state, task, function_of(task[1])))

    @staticmethod
    def _refuse(conn, reason: str) -> None:
        """An executor sent a frame no task of which can be answered: close its link, saying why
        (the executor re-runs or fails what it had in flight on it)."""
        log.warning("closing %r: %s", conn, reason)
        messaging.close_with_goodbye(conn, reason)

    def _on_cancel(self, conn, task_ids) -> None:
        if not isinstance(task_ids, (list, tuple)) or not all(isinstance(task_id, int) for task_id in task_ids):
            log.warning("ignoring a malformed 'cancel' from %r: %s", conn, messaging.shorten(task_ids))
            return
        self._state(conn).cancelled.update(task_ids)

    def _on_init(self, conn, pickled) -> None:
        if self._held_frames is not None and self._hold(self._on_init, conn, pickled):
            return
        state = self._state(conn)
        state.init_done = False
        self._crew.put((conn, state, ("init", pickled), None))

    # -- task threads -----------------------------------------------------------------------------

    def _run(self) -> None:
        crew, reader = self._crew, self._reader
        slot = None  # while running: the index of the task process this thread uses
        dirty: dict[int, tuple] = {}  # links with results not yet sent, by id(state)
        while True:
            item, slot = crew.take(slot)
            if item is None:
                for conn, state, _ in dirty.values():  # idle: send everything now
                    self._flush(conn, state)
                dirty.clear()
                # Nothing of the last task stays alive while this thread waits: not its arguments
                # (views of the frame they came in, whose buffer the link reuses once free), nor
                # its result.
                conn = state = task = function = result = item = None
                if reader.stopping:  # and nothing is left to run
                    return
                crew.reading(True)
                try:
                    reader.wait()  # handles the frames of a lent link that has bytes, on this thread
                except Exception:  # a grid bug: the links are read on (a failed read closes its link)
                    log.exception("reading the executor links failed")
                finally:
                    crew.reading(False)
                continue
            else:
                for key, (conn, state, first) in dirty.items():
                    if first is not None:  # the next task may run long: the IO thread sends these in time
                        conn.driver.call_later(_RESULT_DELAY, self._flush, conn, state)
                        dirty[key] = (conn, state, None)
            process = self._processes[slot] if self._processes else None
            conn, state, task, function = item
            try:
                if task[0] == "init":
                    self._run_initializer(conn, state, task[1])
                    continue
                result = self._execute(state, task, function, process)
            except Exception as exc:  # a grid bug: this task fails, the thread lives on
                log.exception("task %s failed inside grid", messaging.shorten(task))
                if task[0] == "init":
                    continue
                result = (task[0], FAILED, serialize.pack_error(GridError(
                    f"the member could not run the task ({type(exc).__name__}: {exc}); a grid bug")), 0.0)
            size = _value_bytes(result)
            with state.lock:  # another thread may be taking the list in _flush
                state.pending_results.append(result)
                waiting = len(state.pending_results)
                state.pending_bytes = pending = state.pending_bytes + size
            self.tasks_done += 1
            self.task_seconds.append(result[3])
            # Batch results while more work is queued behind this task, within a latency bound
            # (first is None once a timer on the IO thread guarantees that bound) and FRAME_BYTES.
            now = time.perf_counter()
            first = dirty.setdefault(id(state), (conn, state, now))[2]
            if waiting >= _RESULT_BATCH or pending >= FRAME_BYTES or (first is not None and now - first > _RESULT_DELAY):
                self._flush(conn, state)
                del dirty[id(state)]

    def _execute(self, state: _LinkState, task, function: _LoadedFunction | None, process) -> tuple:
        task_id, kind = task[0], task[2]
        if task_id in state.cancelled:
            state.cancelled.discard(task_id)
            return (task_id, CANCELLED, None, 0.0)
        if state.init_error is not None:
            return (task_id, FAILED, state.init_error if kind == CALL else (NO_VALUES, state.init_error), 0.0)
        if function is None or process is None:
            return run_task(None if function is None else function.load(), task)
        if state.init_pickled is not None and not process.initialized(state.serial):
            error = process.initialize(state.serial, state.init_pickled)
            if error is not None:
                state.init_error = error
                return (task_id, FAILED, error if kind == CALL else (NO_VALUES, error), 0.0)
        # The child gets the task by pipe: out-of-band buffers (views of the frame) become bytes.
        task = (*task[:4], [bytes(buffer) for buffer in task[4]]) if task[4] else task
        return process.run(function.serial, function.pickled, task)

    def _flush(self, conn, state: _LinkState) -> None:
        with state.lock:
            results, state.pending_results = state.pending_results, []
            state.pending_bytes = 0
        if not results:
            return
        try:
            parts = serialize.dumps_parts(("results", results))
        except Exception:
            parts = serialize.dumps_parts(("results", [sendable(result) for result in results]))
        try:
            conn.send_frame(messaging.Kind.MESSAGE, parts if len(parts) > 1 else parts[0])
        except GridError as exc:
            log.info("results for %d tasks could not be sent (%s); the executor will retry them", len(results), exc)

    def _run_initializer(self, conn, state: _LinkState, pickled) -> None:
        if self._processes and isinstance(pickled, (bytes, bytearray)):
            state.init_pickled = pickled  # each task process runs it before its first task of this link
        else:
            state.init_error = run_initializer(pickled)
        with state.lock:
            held, state.held = state.held, []
            state.init_done = True
        for task, function in held:
            self._crew.put((conn, state, task, function))


def load_function(pickled):
    """The function ``pickled`` (unpickled here), or a stand-in that raises saying why it cannot load."""
    try:
        return serialize.loads(pickled)
    except Exception as exc:
        return _Unloadable(exc)


def run_task(fn, task) -> tuple:
    """Run one checked task with ``fn`` (None: never sent); its ``(task id, status, value, seconds)``.

    Its arguments are unpickled here, on the thread that runs it, never on the IO thread.
    """
    task_id, function_id, kind, packed, buffers = task
    try:
        args, kwargs = unpack_arguments(packed, buffers)
    except BaseException as exc:  # noqa: B036 - a class not importable here, a failing __setstate__
        failure = RemoteError(f"the task's arguments cannot be unpickled here ({type(exc).__name__}: {exc}); "
                              "is their class importable on every member? (grid.deploy ships it)")
    else:
        problem = _bad_arguments(kind, args, kwargs)
        failure = None if problem is None else GridError(f"malformed task from the executor: {problem}")
    if failure is None and fn is None:
        failure = GridError(f"function {function_id} was never sent on this link, or was forgotten before this "
                            "task arrived (a grid bug)")
    if failure is not None:
        error = serialize.pack_error(failure)
        return (task_id, FAILED, error if kind == CALL else (NO_VALUES, error), 0.0)
    started = time.perf_counter()
    if kind == CALL:
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: B036 - the caller gets every failure
            if isinstance(exc, (KeyboardInterrupt, SystemExit)) and not isinstance(fn, _Unloadable):
                exc = RemoteError(f"task raised {type(exc).__name__}: {exc}")
            return (task_id, FAILED, serialize.pack_error(exc), time.perf_counter() - started)
        seconds = time.perf_counter() - started
        try:
            return (task_id, OK, pack_value(serialize.wrap_buffers((value,))[0]), seconds)
        except Exception as exc:
            return (task_id, UNSENDABLE, _unsendable(value, exc), seconds)
    values = []
    try:  # list.extend keeps what it appended before an exception: the results up to the failure
        values.extend(map(fn, args) if kind == CHUNK1 else itertools.starmap(fn, args))
    except BaseException as exc:  # noqa: B036
        error = serialize.pack_error(exc)
        seconds = time.perf_counter() - started
        try:
            return (task_id, FAILED, (pack_value(serialize.wrap_buffers(values)), error), seconds)
        except Exception:  # what came before the failure cannot travel: the failure still does
            return (task_id, UNSENDABLE, error, seconds)
    seconds = time.perf_counter() - started
    try:
        return (task_id, OK, pack_value(serialize.wrap_buffers(values)), seconds)
    except Exception as exc:
        return (task_id, UNSENDABLE, _unsendable(values, exc), seconds)


def _value_bytes(result: tuple) -> int:
    """The size of a successful result's packed value (a failure's is small)."""
    if result[1] != OK:
        return 0
    pickled, buffers = result[2]
    return packed_size(pickled, buffers)


def _unsendable(value, exc: BaseException) -> tuple:
    return serialize.pack_error(RemoteError(
        f"the task's result ({type(value).__name__}) cannot be pickled: {exc}; "
        "return plain data (or objects that pickle) from tasks"))


def run_initializer(pickled):
    """Run an executor's pickled ``(initializer, initargs)`` here: None, or the packed error every
    task of that link then fails with."""
    try:
        if not isinstance(pickled, (bytes, bytearray, memoryview)):
            raise GridError(f"an 'init' body is a pickled (initializer, initargs), not {messaging.shorten(pickled)}")
        fn, args = serialize.loads(pickled)
        fn(*args)
    except BaseException as exc:  # noqa: B036
        log.error("executor initializer failed: %s", exc)
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        broken = BrokenGrid(f"the executor's initializer failed on member {current_member()} "
                            f"({type(exc).__name__}: {exc}), so none of its tasks run there; fix the "
                            "initializer (its traceback is the __cause__) and make a new executor")
        return (serialize.dumps(broken), text)
    return None


class _Unloadable:
    """Stands in for a function that could not be unpickled here; calling it says why."""

    def __init__(self, error: BaseException):
        self.error = error

    def __call__(self, *args, **kwargs):
        raise RemoteError(f"this member cannot load the function: {type(self.error).__name__}: {self.error}; "
                          "is its module importable on every member? (grid.deploy ships it)") from self.error


def _malformed(task) -> str | None:
    """What is wrong with a task tuple an executor sent, or None if it can be queued (IO thread:
    its arguments are still pickled; ``_bad_arguments`` checks them on the task thread)."""
    if type(task) not in (tuple, list) or len(task) != 5:
        return f"a task is (task id, function id, kind, arguments, buffers), not {messaging.shorten(task)}"
    task_id, function_id, kind, packed, buffers = task
    if not isinstance(task_id, int) or not isinstance(function_id, int):
        return f"task and function ids are ints, not {messaging.shorten(task_id)} and {messaging.shorten(function_id)}"
    if kind not in _KINDS or type(kind) is not int:
        return f"unknown task kind {messaging.shorten(kind)} (known: {_KINDS})"
    if not isinstance(packed, (bytes, bytearray, memoryview)) or type(buffers) not in (tuple, list):
        return f"a task's arguments are pickled bytes and a list of buffers, not {messaging.shorten(packed)}"
    return None


def _bad_arguments(kind, args, kwargs) -> str | None:
    """What is wrong with a task's unpickled arguments, or None."""
    if type(args) not in (tuple, list) and not (kind == CHUNK1 and type(args) is range):
        return f"a task's args are a tuple or list (or a chunk's range), not {type(args).__name__}"
    if kind == CALL and (type(kwargs) is not dict or not all(type(key) is str for key in kwargs)):
        return f"a call's kwargs are a dict with str keys, not {messaging.shorten(kwargs)}"
    return None


def sendable(result: tuple) -> tuple:
    """``result``, or if it cannot be pickled (a packed error whose pieces do not), an UNSENDABLE
    result with an error that says so. Values are pickled apart already (``run_task``)."""
    task_id, status, value, seconds = result
    try:
        serialize.dumps(value)
        return result
    except Exception as exc:
        error = RemoteError(f"the task's outcome cannot be pickled: {exc}")
        return (task_id, UNSENDABLE, serialize.pack_error(error), seconds)
