"""The dispatcher under the executor: tasks placed on per-member links within a credit window.

::

    caller thread: submit_task(fn, kind, ...)        IO thread, or where completions.py runs it
      under the lock, _place the task:               "results" from a member: _on_results
        pinned  -> its member's link                   pops the tasks from in_flight (credit
        service -> the least-loaded link offering it     freed), _refill hands the link queued
        other   -> the least-loaded link                 tasks, _complete resolves the Futures
        no link with credit: queued (the backlog,    scheduled flushes: _flush(link)
          per service name, or per pinned link)
      idle link: _flush now, from this thread:
        one frame of its outbox's tasks (functions
        not yet sent on the link go first, after
        the ids its member may forget)
      busy link: _schedule_flush on the IO thread

A link's credit is the tasks worth keeping in flight on its member: at least
``MIN_CREDIT`` per task thread, more for tiny tasks, learnt from their times. The
``Dispatcher`` keeps the shared state (links, backlogs, the lock) and the per-task hot
path; ``executor.ClusterExecutor`` subclasses it and makes and loses the links. Map's
chunker (``mapping.py``) uses its task-level interface: ``check_open``, ``function_for``,
``submit_task``, ``task_threads`` and ``link_count``.

A function is pickled once and sent once per link, then named by its id. The cache of
pickled functions keeps the newest ``_FUNCTION_CACHE``; when it drops one, every link
that sent it puts its id on a forget list, and the link's next frame tells its member
to forget it (before the frame's functions, so a task of that frame that still uses it
sends it again). The member resolves a task's function when the task arrives, so a
task queued there before the forget still runs. A member thus holds, per link, at
most the functions in the cache plus those of the link's last frame.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import weakref
from concurrent.futures import CancelledError, Future, InvalidStateError

from ..errors import GridError, RemoteError, WorkerCrashed
from ..net import messaging, serialize
from ..net.lending import LinkReader
from ..net.wire import Kind
from .completions import Completions, future_class, plain, wait_any
from .protocol import CALL, CANCELLED, FRAME_BYTES, OK, UNSENDABLE, pack_arguments, packed_size, unpack_value

log = logging.getLogger("grid.executor")  # one logger for all of the executor, whichever file logs

MIN_CREDIT = 2  # tasks in flight per member task thread, at least
_MAX_CREDIT = 64  # ... and at most, when tasks are tiny
_QUEUED_WORK = 0.002  # seconds of work worth keeping queued on a member per task thread
_FUNCTION_CACHE = 1024  # pickled functions kept (the newest); members forget the ones dropped


class _PickledFunction:
    """A function pickled once for every link, and the links it was sent on (told to forget it
    when the cache drops it)."""

    __slots__ = ("id", "pickled", "links", "evicted")

    def __init__(self, function_id: int, pickled: bytes):
        self.id = function_id
        self.pickled = pickled
        self.links: list[Link] = []  # appended by _flush when it first sends it on a link
        self.evicted = False

    def evict(self) -> None:
        """(Under the dispatcher's lock) the cache dropped it: each link that sent it forgets it.

        A link that sends it from now on (a task that took it before it was dropped) sees
        ``evicted`` and puts it on its own forget list; one racing with this call may do
        both, and a second forget of an id finds it gone and is skipped.
        """
        self.evicted = True
        links, self.links = self.links, []
        for link in links:
            link.forget.append(self.id)


class _Task:
    __slots__ = ("id", "future", "fn", "function_id", "function", "kind", "args", "kwargs", "attempts", "pinned",
                 "link", "deaths", "sent_bytes", "__weakref__")
    service = None  # a class attribute: an ordinary task pays nothing for services (see _ServiceTask)

    def __init__(self, task_id, future, fn, function, kind, args, kwargs, pinned=None):
        self.id = task_id
        self.future = future
        self.fn = fn
        self.function = function  # a _PickledFunction
        self.function_id = function.id
        self.kind = kind
        self.args = args
        self.kwargs = kwargs
        self.attempts = 0
        self.pinned = pinned  # a member uuid, or None for any member
        self.link = None
        self.deaths = ()  # (member, close reason) of each link lost while it ran there
        self.sent_bytes = 0  # the size of its packed arguments, once sent

    def release(self) -> None:
        """Its Future is done: let go of its function, arguments and everything they hold."""
        self.fn = self.function = self.args = self.kwargs = None

    def describe(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        if self.args is None:
            return name
        if self.kind != CALL:
            return f"{name} over a chunk of {len(self.args)} items (first: {_short(self.args[0]) if self.args else ''})"
        return f"{name}{_short(self.args)}"


class _ServiceTask(_Task):
    """A task that may run only on a member offering the service ``service``."""

    __slots__ = ("service", "lost")

    def __init__(self, task_id, future, fn, function, kind, args, kwargs, pinned, service):
        super().__init__(task_id, future, fn, function, kind, args, kwargs, pinned)
        self.service = service
        self.lost = None  # why the member last running it was lost, for a later error

    def describe(self) -> str:
        if self.args is not None and self.kind != CALL:
            first = _short(self.args[0]) if self.args else ""
            return f"service {self.service!r} over a chunk of {len(self.args)} items (first: {first})"
        return f"service {self.service!r}{_short(self.args)}"


class Link:
    """This executor's connection to one member, with its credit window."""

    __slots__ = ("member", "conn", "in_flight", "outbox", "sent_functions", "forget", "send_lock",
                 "flush_pending", "pinned", "average", "closed", "services")

    def __init__(self, member, conn):
        self.member = member
        self.conn = conn
        self.in_flight: dict[int, _Task] = {}
        self.outbox: list[_Task] = []
        self.sent_functions: set[int] = set()  # ids its member holds (or is about to: frames in order)
        self.forget: collections.deque = collections.deque()  # ids dropped from the cache: next frame says so
        self.send_lock = threading.Lock()
        self.flush_pending = False
        self.pinned: collections.deque = collections.deque()
        self.average = None  # seconds per task, moving average
        self.closed = False
        self.services: frozenset | None = None  # names its member offers; None until it answered

    @property
    def credit(self) -> int:
        return max(1, self.member.workers) * credit_per_worker(self.average)

    def spare(self) -> int:
        return self.credit - len(self.in_flight)


def credit_per_worker(task_seconds: float | None) -> int:
    """Tasks worth keeping in flight per member task thread, for tasks taking ``task_seconds``."""
    if task_seconds is None:
        return MIN_CREDIT
    return int(min(_MAX_CREDIT, max(MIN_CREDIT, _QUEUED_WORK / max(task_seconds, 1e-6))))


class Dispatcher:
    """Places tasks on links to members within each link's credit, sends them, resolves their Futures.

    The base of ``ClusterExecutor``, which provides what placing a task needs from outside:
    ``_transport`` (its IO thread sends batched frames), ``_cluster`` (the member list),
    ``_open_link(member)`` (a pinned task's member has no link yet) and ``_starved_error(task)``
    (no member has been reachable for failure_timeout: what a task submitted now fails with).
    """

    def __init__(self):
        self._lock = threading.RLock()
        self._shutdown = False
        self._torn_down = False  # the links are let go: nothing can be sent any more
        self._ids = itertools.count(1)
        self._links: dict[str, Link] = {}
        self._connecting: set[str] = set()  # member uuids whose link is being made
        self._backlog: collections.deque = collections.deque()
        self._service_backlog: dict[str, collections.deque] = {}  # service tasks waiting, by service name
        self._functions: collections.OrderedDict = collections.OrderedDict()  # id(fn) -> (fn, (id, pickled))
        self._function_ids = itertools.count(1)
        self._all_done = threading.Condition(self._lock)
        self._outstanding = 0
        self._starved = False  # no link for failure_timeout: tasks fail at once instead of waiting
        self._starve_timer = None  # set while no link is open: when it fires, waiting tasks fail
        # Results are completed there, unless that surely runs no user code (executor._results_arrived).
        # The links are lent to the callers waiting for results (and the results thread): see
        # completions.py; a member's reply wakes the waiting caller, not the IO thread.
        self._link_reader = LinkReader()
        self._completions = Completions(reader=self._link_reader)
        self._future_class = future_class(self._completions)

    # -- submitting ---------------------------------------------------------------------------------------

    # The task-level interface: the executor's submit* and map's chunker (mapping.py) use it.

    @property
    def is_shutdown(self) -> bool:
        """True once ``shutdown()`` has begun: no new work is taken."""
        return self._shutdown

    def check_open(self) -> None:
        """Raises RuntimeError once shutdown has begun (as the stdlib's executors do)."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def task_threads(self) -> int:
        """Task threads across the linked members (at least 1)."""
        with self._lock:
            return sum(max(1, link.member.workers) for link in self._links.values()) or 1

    def link_count(self) -> int:
        """Members linked right now."""
        return len(self._links)

    def wait_any(self, futures, timeout: float | None) -> None:
        """Return once one of ``futures`` (this executor's) is done or ``timeout`` passed; meanwhile this
        thread completes the executor's Futures whose results came (``completions.py``)."""
        wait_any(self._completions, futures, timeout)

    def submit_task(self, fn, kind, args, kwargs, pinned, function=None, service=None, *,
                    after_shutdown: bool = False) -> Future:
        """Place one task of ``kind`` (``protocol.CALL``, ``CHUNK``, ``CHUNK1``); returns its Future.

        ``pinned``: a member uuid it must run on; ``function``: ``fn`` already pickled
        (``function_for(fn)``); ``service``: only members offering that name may run it;
        ``after_shutdown``: taken while shutdown waits for work (a map given its items before).
        """
        if not after_shutdown or self._torn_down:
            self.check_open()
        if function is None or function.evicted:  # a map's function may have left the cache since
            function = self.function_for(fn)
        future: Future = self._future_class()
        if service is None:
            task = _Task(next(self._ids), future, fn, function, kind, args, kwargs, pinned)
        else:
            task = _ServiceTask(next(self._ids), future, fn, function, kind, args, kwargs, pinned, service)
        # Weakly: a callback holding the task would make a cycle (Future -> callback -> task ->
        # Future) that keeps a done task's result alive until the cyclic collector runs.
        task_ref = weakref.ref(task)
        future.add_grid_callback(lambda done: self._task_done(task_ref))
        with self._lock:
            if self._torn_down or (self._shutdown and not after_shutdown):
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._outstanding += 1
            link, send_now = self._place(task)
        if link is not None:
            if send_now:
                self._flush(link)
            else:
                self._schedule_flush(link)
        return future

    def function_for(self, fn) -> _PickledFunction:
        """``fn`` pickled, once while it stays in the cache (the newest ``_FUNCTION_CACHE`` stay)."""
        cached = self._functions.get(id(fn))
        if cached is not None and cached[0] is fn:
            return cached[1]
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        pickled = serialize.dumps_function(fn)
        with self._lock:
            cached = self._functions.get(id(fn))
            if cached is not None and cached[0] is fn:  # another thread pickled it meanwhile: one id per fn
                return cached[1]
            function = _PickledFunction(next(self._function_ids), pickled)
            self._functions[id(fn)] = (fn, function)  # holding fn keeps its id from being reused
            while len(self._functions) > _FUNCTION_CACHE:
                self._functions.popitem(last=False)[1][1].evict()
        return function

    # -- placement (under self._lock) -------------------------------------------------------------------

    def _place(self, task: _Task):
        """Give ``task`` to a link with credit, or queue it. Returns (link, send_now)."""
        if task.pinned is not None:
            link = self._links.get(task.pinned)
            if link is None:
                if task.pinned not in self._connecting:  # listed, but its joined event is not handled yet
                    member = next((m for m in self._cluster.members() if m.uuid == task.pinned), None)
                    if member is not None:
                        self._open_link(member)
                if task.pinned in self._connecting:
                    self._backlog.append(task)
                    return None, False
                self._fail_pinned(task)
                return None, False
            if link.spare() <= 0:
                link.pinned.append(task)
                return None, False
        elif task.service is not None:
            link = self._least_loaded_offering(task.service)
            if link is None:
                self._service_backlog.setdefault(task.service, collections.deque()).append(task)
                if not self._may_offer(task.service):  # its members left since submit_service looked
                    self._fail_unservable()
                return None, False
        else:
            link = self._least_loaded()
            if link is None:
                if self._starved and not self._links:
                    self._fail_starved(task)
                else:
                    self._backlog.append(task)
                return None, False
        was_idle = not link.in_flight
        self._assign(link, task)
        return link, was_idle

    def _least_loaded(self):
        """The link with the least work in flight per task thread, among those with credit."""
        best, best_load = None, None
        for link in self._links.values():
            in_flight = len(link.in_flight)
            if not in_flight:
                return link  # idle (and a link's credit is at least 2): none is less loaded
            if in_flight >= link.credit:
                continue
            load = in_flight / max(1, link.member.workers)
            if best_load is None or load < best_load:
                best, best_load = link, load
        return best

    def _least_loaded_offering(self, name: str):
        """Like ``_least_loaded``, among the links whose member offers the service ``name``."""
        best, best_load = None, None
        for link in self._links.values():
            if link.services is None or name not in link.services or link.spare() <= 0:
                continue
            load = len(link.in_flight) / max(1, link.member.workers)
            if best_load is None or load < best_load:
                best, best_load = link, load
        return best

    def _may_offer(self, name: str) -> bool:
        """Whether some member may still run the service ``name``: a link offers it, has not said
        what it offers yet, or is being made."""
        if self._connecting:
            return True
        return any(link.services is None or name in link.services for link in self._links.values())

    def _fail_unservable(self) -> None:
        """Fail the waiting service tasks that no member can run any more."""
        for name in [name for name in self._service_backlog if not self._may_offer(name)]:
            waiting = self._service_backlog.pop(name)
            offered = sorted({offered for link in self._links.values() for offered in link.services or ()})
            for task in waiting:
                self._finish_outstanding(1)
                why = f" ({task.lost})" if task.lost else ""
                fail(task.future, WorkerCrashed(
                    f"task {task.describe()} cannot run: no remaining member offers service {name!r}{why}; "
                    f"the services offered now are {offered or 'none'}; start a member that offers it"))

    def _assign(self, link: Link, task: _Task) -> None:
        task.link = link
        link.in_flight[task.id] = task
        link.outbox.append(task)

    def _refill(self, link: Link) -> bool:
        """Hand queued tasks to ``link`` up to its credit; True if any were given."""
        given = False
        while link.spare() > 0 and link.pinned:
            task = link.pinned.popleft()
            if task.future.cancelled():  # its _cancelled callback may not have run yet
                self._finish_outstanding(1)
                continue
            self._assign(link, task)
            given = True
        if self._service_backlog and link.services:
            given = self._refill_services(link) or given
        skipped = []
        while link.spare() > 0 and self._backlog:
            task = self._backlog.popleft()
            if task.future.cancelled():
                self._finish_outstanding(1)
                continue
            if task.pinned is not None and task.pinned != link.member.uuid:
                skipped.append(task)
                continue
            self._assign(link, task)
            given = True
        self._backlog.extendleft(reversed(skipped))
        return given

    def _refill_services(self, link: Link) -> bool:
        """Hand waiting tasks of the services ``link``'s member offers to it, up to its credit."""
        given = False
        for name in link.services & self._service_backlog.keys():
            waiting = self._service_backlog[name]
            while link.spare() > 0 and waiting:
                task = waiting.popleft()
                if task.future.cancelled():
                    self._finish_outstanding(1)
                    continue
                self._assign(link, task)
                given = True
            if not waiting:
                del self._service_backlog[name]
            if link.spare() <= 0:
                break
        return given

    def _fail_starved(self, task: _Task) -> None:
        """(Under the lock) fail ``task``: no member has been reachable for failure_timeout."""
        self._finish_outstanding(1)
        fail(task.future, self._starved_error(task))

    def _fail_pinned(self, task: _Task) -> None:
        self._finish_outstanding(1)
        fail(task.future, WorkerCrashed(f"task {task.describe()} was pinned to a member that is no longer in the cluster"))

    # -- sending ------------------------------------------------------------------------------------------

    def _schedule_flush(self, link: Link) -> None:
        with self._lock:
            if link.flush_pending:
                return
            link.flush_pending = True
        self._transport.call_soon(self._flush, link)

    def _flush(self, link: Link) -> None:
        """Send what is in ``link``'s outbox: the ids its member may forget, the functions not yet
        sent on the link, the tasks; in one frame, or one per ``FRAME_BYTES`` of large arguments."""
        with link.send_lock:
            with self._lock:
                tasks, link.outbox = link.outbox, []
                link.flush_pending = False
            if not tasks or link.closed:
                return
            forget = _take_forgotten(link) if link.forget else ()  # first: a task below may send one again
            functions, wire_tasks, dropped, size = [], [], 0, 0
            for task in tasks:
                # Running from now on, as a stdlib executor's work is once it is handed to a worker:
                # it can no longer be cancelled. One cancelled meanwhile is dropped here.
                if not start(task.future):
                    with self._lock:
                        if link.in_flight.pop(task.id, None) is not None:
                            self._finish_outstanding(1)
                            dropped += 1
                    continue
                if task.function_id not in link.sent_functions:
                    link.sent_functions.add(task.function_id)
                    function = task.function
                    functions.append((function.id, function.pickled))
                    function.links.append(link)
                    if function.evicted:  # dropped while this task waited: the next frame forgets it again
                        link.forget.append(function.id)
                try:
                    packed, buffers = pack_arguments(task.args, task.kwargs)
                except Exception as exc:  # its arguments cannot travel: it fails, the others go
                    self._fail_unsendable(link, task, exc)
                    continue
                wire_tasks.append((task.id, task.function_id, task.kind, packed, buffers))
                task.sent_bytes = sent = packed_size(packed, buffers)
                size += sent
                if size >= FRAME_BYTES:  # large arguments: this frame goes now, the member starts on it
                    self._send_tasks(link, forget, functions, wire_tasks)
                    forget, functions, wire_tasks, size = (), [], [], 0
            if dropped:
                with self._lock:
                    if self._refill(link):  # the credit they held goes to queued work
                        self._schedule_flush(link)
            if wire_tasks or forget or functions:
                self._send_tasks(link, forget, functions, wire_tasks)

    @staticmethod
    def _send_tasks(link: Link, forget, functions, wire_tasks) -> None:
        parts = serialize.dumps_parts(("tasks", (forget, functions, wire_tasks)))
        try:
            link.conn.send_frame(Kind.MESSAGE, parts if len(parts) > 1 else parts[0])
        except GridError as exc:
            log.debug("sending to %s failed (%s); its tasks are retried when the link closes", link.member, exc)

    def _fail_unsendable(self, link: Link, task: _Task, exc: BaseException) -> None:
        with self._lock:
            link.in_flight.pop(task.id, None)
            self._finish_outstanding(1)
        fail(task.future, exc)

    def _task_done(self, task_ref) -> None:
        """(A done-callback) a task's Future is done: a cancelled one leaves the queue it waits in.

        A task no queue holds any more is gone already: nothing to do."""
        task = task_ref()
        if task is None:
            return
        if task.future.cancelled():
            self._cancelled(task)
        task.release()  # no argument or result outlives the Future's end here

    def _cancelled(self, task: _Task) -> None:
        """A Future was cancelled, so it had not started: drop the task from where it waits, and
        tell the Future's waiters (``wait``, ``as_completed``) at once, as the stdlib does.

        A task in a link's outbox is dropped by ``_flush``, which finds it cancelled.
        """
        with self._lock:
            link = task.link
            if link is None or task.id not in link.in_flight:
                pinned_link = self._links.get(task.pinned) if task.pinned is not None else None
                service_waiting = self._service_backlog.get(task.service, ()) if task.service is not None else ()
                for waiting in (self._backlog, pinned_link.pinned if pinned_link else (), service_waiting):
                    if task in waiting:
                        waiting.remove(task)
                        self._finish_outstanding(1)
                        break
                if not service_waiting and task.service in self._service_backlog:  # empty: _refill would look in vain
                    del self._service_backlog[task.service]
        start(task.future)  # a cancelled Future: this notifies its waiters

    # -- results (completions.py, or the IO thread for plain values) ----------------------------------------

    def _on_results(self, conn, results) -> None:
        link = conn.attachment
        finished = []
        with self._lock:
            try:
                for task_id, status, value, seconds in results:
                    task = link.in_flight.pop(task_id, None)
                    if task is None:
                        continue
                    finished.append((task, status, value, seconds))
                    if status != CANCELLED:  # per task, chunks too: the credit counts tasks
                        link.average = seconds if link.average is None else 0.8 * link.average + 0.2 * seconds
            except Exception as exc:  # a member sent garbage: its tasks fail over when the link closes
                for task, *_ in finished:
                    link.in_flight[task.id] = task
                malformed = f"malformed 'results' from member {link.member}: {type(exc).__name__}: {exc}"
            else:
                malformed = None
                self._finish_outstanding(len(finished))
                # (Nothing waits, the usual case for a lone caller: no need to look.)
                more = bool(self._backlog or link.pinned or self._service_backlog) and self._refill(link)
        if malformed is not None:
            log.warning("closing the link: %s", malformed)
            messaging.close_with_goodbye(conn, malformed)
            return
        for task, status, value, seconds in finished:
            try:
                _complete(task, status, value, seconds)
            except Exception as exc:  # noqa: B036 - a class not importable here, a failing __setstate__
                if not task.future.done():
                    task.future.set_exception(RemoteError(
                        f"the result of task {task.describe()} (run on member {link.member}) cannot be "
                        f"unpickled here ({type(exc).__name__}: {exc}); is its class importable where the "
                        "executor runs? (a member of another grid version sends results this side cannot "
                        "read, too)"))
        # Nothing of them stays alive while this thread goes on (its caller may have taken them and
        # let go already): not the tasks, whose Futures hold the results.
        finished = task = value = None
        if more:
            self._flush(link)

    def _finish_outstanding(self, count: int) -> None:
        if count:
            self._outstanding -= count
            if self._outstanding == 0:
                self._all_done.notify_all()
                self._completions.wake_all()  # shutdown waits there (a cancelled task ends no Future)


def _take_forgotten(link: Link) -> list:
    """(Under ``link.send_lock``) the ids on ``link``'s forget list that its member holds, no longer
    counted as sent."""
    forget, pending, sent = [], link.forget, link.sent_functions
    while pending:
        function_id = pending.popleft()
        if function_id in sent:  # not if it was forgotten already, or never reached the member
            sent.discard(function_id)
            forget.append(function_id)
    return forget


def start(future: Future) -> bool:
    """Mark ``future`` running, as a stdlib executor does when it hands work to a worker.

    True if it runs (or already did); False if it was cancelled (its waiters are told now)
    or is already done.
    """
    if future.running():
        return True
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # cancelled and notified already, or done, or started by another thread
        return future.running()


def fail(future: Future, error: BaseException) -> None:
    """Fail ``future`` with ``error`` unless it was cancelled or is already done."""
    if start(future):
        try:
            future.set_exception(error)
        except InvalidStateError:  # settled by another thread meanwhile
            pass


def _complete(task: _Task, status, value, seconds) -> None:
    """Resolve ``task``'s Future from its result; the value is unpickled here (on the IO thread only if plain).

    Raises:
        Exception: the result cannot be unpickled here (the caller fails the task, saying why).
    """
    future = task.future
    if status == CANCELLED:  # the member skipped it (the executor was abandoned)
        if not future.cancel():
            fail(future, CancelledError(f"task {task.describe()} was skipped: the executor was abandoned"))
        return
    if not future.running() and (not start(future) or future.done()):  # (running: not done, one look)
        return
    if task.kind != CALL:  # a chunk: (values, error, member seconds, bytes both ways)
        if status == OK:
            future.set_result((unpack_value(value), None, seconds, task.sent_bytes + packed_size(*value)))
        elif status == UNSENDABLE:
            future.set_result(([], serialize.unpack_error(value), seconds, task.sent_bytes))
        else:
            values, packed = value
            error = serialize.unpack_error(packed)
            future.set_result((unpack_value(values), error, seconds, task.sent_bytes + packed_size(*values)))
        return
    if status == OK:
        future.set_result(unpack_value(value))
    else:
        future.set_exception(serialize.unpack_error(value))


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
