"""GridExecutor: a ``concurrent.futures.Executor`` whose workers are the members of a cluster.

::

    caller threads                                   IO thread (the executor's own "grid-io")
    --------------                                   -----------------------------------------
    submit(fn, *args) -> Future                      "results" from a member:
      pick the least-loaded link with credit           futures resolved, credit freed,
      idle link: send now, from this thread            backlog handed to the freed link
      busy link: queue; sent in one frame later      a link drops or its member leaves:
    map(fn, *its): chunks submitted as results         its in-flight tasks go back to the
      are consumed; yields in order                    backlog (at most max_retries times)
    submit_service(name, *args): the same, but       a link opens: ask its member which
      only links whose member offers ``name``          services it offers ("services")
      (a miss asks every member again, then
      raises ServiceNotFound); waits in its own
      backlog per name

No central scheduler: this process sends work to each member directly, keeping a
credit window per member (bounded work in flight), so ``map`` over an endless
iterable runs in bounded memory. A function travels once per link and is then
named by its id; tiny tasks share frames both ways. A service task is an ordinary
task running ``services.call_service(name, ...)``, placed only on members that
offer ``name`` (and re-run only on those if its member dies).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import logging
import math
import operator
import threading
import time
from concurrent.futures import Future

from . import messaging, serialize
from .client import Cluster, close_at_exit, connect, forget_at_exit
from .config import format_address, load_config
from .errors import BrokenGrid, GridError, NotConnected, RemoteError, ServiceNotFound, WorkerCrashed
from .membership import local_target
from .services import HOW_TO_OFFER, call_service
from .transport import Transport
from .wire import Kind
from .worker import CALL, CANCELLED, CHUNK, CHUNK1, OK, UNSENDABLE

log = logging.getLogger("grid.executor")

_MIN_CREDIT = 2  # tasks in flight per member task thread, at least
_MAX_CREDIT = 64  # ... and at most, when tasks are tiny
_QUEUED_WORK = 0.002  # seconds of work worth keeping queued on a member per task thread
_CHUNK_TARGET = 0.01  # seconds a map chunk should take on a member
_MAX_CHUNK = 65536
_FUNCTION_CACHE = 1024


class RemoteTraceback(Exception):
    """The traceback of an exception raised on a member; attached as ``__cause__``."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class _Task:
    __slots__ = ("id", "future", "fn", "function_id", "pickled", "kind", "args", "kwargs", "attempts", "pinned",
                 "link")
    service = None  # a class attribute: an ordinary task pays nothing for services (see _ServiceTask)

    def __init__(self, task_id, future, fn, function, kind, args, kwargs, pinned=None):
        self.id = task_id
        self.future = future
        self.fn = fn
        self.function_id, self.pickled = function
        self.kind = kind
        self.args = args
        self.kwargs = kwargs
        self.attempts = 0
        self.pinned = pinned  # a member uuid, or None for any member
        self.link = None

    def describe(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
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
        if self.kind != CALL:
            first = _short(self.args[0]) if self.args else ""
            return f"service {self.service!r} over a chunk of {len(self.args)} items (first: {first})"
        return f"service {self.service!r}{_short(self.args)}"


class _Link:
    """This executor's connection to one member, with its credit window."""

    __slots__ = ("member", "conn", "in_flight", "outbox", "sent_functions", "send_lock", "flush_pending",
                 "pinned", "average", "closed", "services")

    def __init__(self, member, conn):
        self.member = member
        self.conn = conn
        self.in_flight: dict[int, _Task] = {}
        self.outbox: list[_Task] = []
        self.sent_functions: set[int] = set()
        self.send_lock = threading.Lock()
        self.flush_pending = False
        self.pinned: collections.deque = collections.deque()
        self.average = None  # seconds per task, moving average
        self.closed = False
        self.services: frozenset | None = None  # names its member offers; None until it answered

    @property
    def credit(self) -> int:
        return max(1, self.member.workers) * _credit_per_worker(self.average)

    def spare(self) -> int:
        return self.credit - len(self.in_flight)


def _credit_per_worker(task_seconds: float | None) -> int:
    """Tasks worth keeping in flight per member task thread, for tasks taking ``task_seconds``."""
    if task_seconds is None:
        return _MIN_CREDIT
    return int(min(_MAX_CREDIT, max(_MIN_CREDIT, _QUEUED_WORK / max(task_seconds, 1e-6))))


class GridExecutor(concurrent.futures.Executor):
    """Run callables on the members of a cluster; returns stdlib ``Future``s.

    Args:
        max_workers: with no cluster configured, the number of member processes of the
            embedded local cluster (default: the core count). Ignored for a given cluster.
        cluster: a ``grid.Cluster`` (from ``grid.connect``), or anything ``grid.connect``
            takes (a config dict or path). None: the configured cluster, or, if nothing is
            configured, a private embedded cluster torn down on shutdown.
        initializer, initargs: ``initializer(*initargs)`` runs once on every member
            before it takes this executor's work.
        max_retries: how often a task is re-run after the member running it died.

    Raises:
        NotConnected: no member of the cluster could be reached.
    """

    def __init__(self, max_workers: int | None = None, *, cluster=None, initializer=None, initargs=(),
                 max_retries: int = 3, startup_timeout: float = 30.0):
        if max_workers is not None and max_workers < 1:
            raise ValueError("max_workers must be greater than 0")
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        self._max_retries = max_retries
        self._lock = threading.RLock()
        self._shutdown = False
        self._ids = itertools.count(1)
        self._links: dict[str, _Link] = {}
        self._connecting: set[str] = set()
        self._backlog: collections.deque = collections.deque()
        self._service_backlog: dict[str, collections.deque] = {}  # service tasks waiting, by service name
        self._service_functions: dict[str, functools.partial] = {}  # name -> call_service bound to it
        self._functions: collections.OrderedDict = collections.OrderedDict()  # id(fn) -> (fn, (id, pickled))
        self._function_ids = itertools.count(1)
        self._all_done = threading.Condition(self._lock)
        self._outstanding = 0
        self._embedded = None
        self._owns_cluster = False
        self._init = None
        if initializer is not None:
            self._init = serialize.dumps((initializer, tuple(initargs)))
        self._cluster = self._open_cluster(cluster, max_workers, startup_timeout)
        config = self._cluster.config
        self._router = messaging.Router()
        self._router.register("results", self._on_results)
        try:
            self._transport = Transport(
                cluster_id=config.id, secret=config.resolved_secret(), info={"role": "executor"},
                on_frame=self._router.on_frame, on_close=self._on_link_closed,
                handshake_timeout=config.handshake_timeout, tls=config.tls, name="grid-io-executor")
        except BaseException:
            self._close_cluster()
            raise
        self._cluster.add_membership_listener(self._on_membership)
        for member in self._cluster.members():
            self._open_link(member)
        self._await_links(startup_timeout)
        close_at_exit(self, self.shutdown)

    # -- setting up ---------------------------------------------------------------------------------

    def _open_cluster(self, cluster, max_workers, startup_timeout) -> Cluster:
        if isinstance(cluster, Cluster):
            return cluster
        if cluster is None:
            config = load_config()
            if config.source == "defaults":
                from .embedded import EmbeddedCluster

                self._embedded = EmbeddedCluster(max_workers or config.effective_workers(),
                                                 startup_timeout=startup_timeout)
                cluster = self._embedded.client_config()
            else:
                cluster = config
        try:
            opened = connect(cluster, timeout=startup_timeout)
        except BaseException:
            if self._embedded is not None:
                self._embedded.close()
            raise
        self._owns_cluster = True
        return opened

    def _await_links(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:  # every first link attempt concluded, and at least one link open
            while self._connecting or not self._links:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (not self._connecting and not self._cluster.members()):
                    break
                self._all_done.wait(min(remaining, 0.05))
            if self._links:
                return
        self._teardown()
        raise NotConnected("the executor could not link to any member of the cluster; "
                           "check that members are running (`python -m grid members`)")

    def _open_link(self, member) -> None:
        with self._lock:
            if member.uuid in self._links or member.uuid in self._connecting or self._shutdown:
                return
            self._connecting.add(member.uuid)
        future = self._transport.connect(local_target(member))
        future.add_done_callback(lambda done: self._link_opened(member, done))

    def _link_opened(self, member, done: Future) -> None:
        # The member stays in _connecting until its link is in _links: a task pinned to it
        # (submit_to_all right after __init__) waits in the backlog instead of failing.
        error = None if done.cancelled() else done.exception()
        with self._lock:
            if done.cancelled() or error is not None:
                log.info("cannot link to member %s: %s", member, error)
                self._link_failed(member)
                return
            conn = done.result()
            if self._shutdown or all(m.uuid != member.uuid for m in self._cluster.members()):
                conn.close("not needed")
                self._link_failed(member)
                return
            link = _Link(member, conn)
            conn.attachment = link
        if self._init is not None:
            try:
                messaging.send(conn, "init", self._init)
            except GridError:
                with self._lock:
                    self._link_failed(member)
                return
        with self._lock:
            self._connecting.discard(member.uuid)
            self._links[member.uuid] = link
            self._refill(link)
            self._all_done.notify_all()
        self._flush(link)
        self._ask_services(link)

    def _link_failed(self, member) -> None:
        """(Under self._lock) no link to ``member``: fail the tasks waiting for it."""
        self._connecting.discard(member.uuid)
        waiting = [task for task in self._backlog if task.pinned == member.uuid]
        for task in waiting:
            self._backlog.remove(task)
            self._fail_pinned(task)
        if self._service_backlog:
            self._fail_unservable()
        self._all_done.notify_all()

    def _on_membership(self, event) -> None:
        if event.kind == "joined":
            self._open_link(event.member)
            return
        with self._lock:
            link = self._links.get(event.member.uuid)
        if link is not None:
            link.conn.close(f"member {event.member} left the cluster")

    # -- submitting -----------------------------------------------------------------------------------

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on the least loaded member; returns a Future.

        Raises:
            RuntimeError: the executor is shut down.
            SerializationError: ``fn`` cannot travel (a lambda without cloudpickle).
        """
        return self._submit(fn, CALL, args, kwargs, None)

    def submit_to_member(self, member, fn, /, *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on ``member`` (a Member, its uuid or its "host:port").

        The Future fails with ``WorkerCrashed`` if that member dies or leaves first.
        """
        return self._submit(fn, CALL, args, kwargs, self._resolve_member(member).uuid)

    def submit_to_all(self, fn, /, *args, **kwargs) -> dict:
        """Run ``fn(*args, **kwargs)`` once on every current member; returns ``{member: Future}``."""
        return {member: self._submit(fn, CALL, args, kwargs, member.uuid) for member in self.members()}

    def members(self) -> list:
        """The members this executor can send work to."""
        return self._cluster.members()

    # -- services -------------------------------------------------------------------------------------

    def submit_service(self, name: str, /, *args, **kwargs) -> Future:
        """Run the service ``name`` with ``(*args, **kwargs)`` on the least loaded member offering it.

        Only members offering ``name`` (``@grid.service`` in a module they import) get the
        task; if its member dies, it is re-run on another member offering it (up to
        ``max_retries``), and fails with ``WorkerCrashed`` if none is left.

        Raises:
            ServiceNotFound: no member offers ``name`` (checked at once, after asking every
                member again); the message lists the services the cluster offers.
            RuntimeError: the executor is shut down.
        """
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        function = self._check_service(name)
        return self._submit(function, CALL, args, kwargs, None, service=name)

    def map_service(self, name: str, /, *iterables, timeout=None, chunksize=None):
        """Like ``map(service, *iterables)``, run only on members offering the service ``name``.

        Lazy, ordered and bounded in memory like ``map``; fails over like ``submit_service``.

        Raises:
            ServiceNotFound: no member offers ``name`` (raised here, before any item is taken).
        """
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        end = None if timeout is None else time.monotonic() + timeout
        function = self._check_service(name)
        return _ordered_results(self._chunk_futures(function, iterables, chunksize, service=name), end)

    def services(self) -> dict:
        """``{service name: [members offering it]}`` as this executor last heard from its members."""
        offered: dict = {}
        with self._lock:
            for link in self._links.values():
                for name in link.services or ():
                    offered.setdefault(name, []).append(link.member)
        return dict(sorted(offered.items()))

    def _check_service(self, name):
        """The function that runs ``name`` on a member; raises ServiceNotFound if nobody offers it."""
        if not isinstance(name, str):
            raise TypeError(f"a service name is a string, not {type(name).__name__} {name!r}")
        if not self._offered_by_a_link(name):
            self._refresh_services()  # a miss: our knowledge may be old (a member imported it since)
            if not self._offered_by_a_link(name):
                names = sorted(self.services())
                raise ServiceNotFound(f"no member of the cluster offers a service named {name!r}; the services "
                                      f"offered are {names or 'none'}; {HOW_TO_OFFER}")
        function = self._service_functions.get(name)
        if function is None:
            function = self._service_functions.setdefault(name, functools.partial(call_service, name))
        return function

    def _offered_by_a_link(self, name: str) -> bool:
        with self._lock:
            return any(link.services is not None and name in link.services for link in self._links.values())

    def _ask_services(self, link: _Link) -> Future | None:
        """Ask ``link``'s member which services it offers; the answer is learnt on the IO thread."""
        try:
            asked = messaging.request(link.conn, "services", None)
        except GridError:
            return None  # the link is closing: _on_link_closed takes care of its tasks
        asked.add_done_callback(lambda done: self._services_answered(link, done))
        return asked

    def _services_answered(self, link: _Link, done: Future) -> None:
        error = GridError("the request was cancelled") if done.cancelled() else done.exception()
        if error is not None and not link.closed:
            log.info("member %s did not say which services it offers (%s); it gets no service tasks",
                     link.member, error)
        self._learn_services(link, () if error is not None else done.result())

    def _learn_services(self, link: _Link, names) -> None:
        with self._lock:
            link.services = frozenset(names)
            more = not link.closed and bool(self._service_backlog) and self._refill(link)
            if self._service_backlog:
                self._fail_unservable()
        if more:
            self._flush(link)

    def _refresh_services(self) -> None:
        """Ask every linked member which services it offers, and wait (up to the handshake timeout)."""
        with self._lock:
            links = [link for link in self._links.values() if not link.closed]
        asked = [(link, self._ask_services(link)) for link in links]
        asked = [(link, request) for link, request in asked if request is not None]
        if threading.current_thread() is self._transport._thread:
            return  # called from a callback on the IO thread: waiting here would block the answers
        concurrent.futures.wait([request for _, request in asked], timeout=self._cluster.config.handshake_timeout)
        for link, request in asked:  # learnt here too: a Future wakes its waiters before its callbacks run
            if request.done() and not request.cancelled() and request.exception() is None:
                self._learn_services(link, request.result())

    def _resolve_member(self, member):
        for candidate in self._cluster.members():
            if member in (candidate, candidate.uuid, format_address(candidate.address), candidate.address):
                return candidate
        raise GridError(f"{member!r} is not a member of the cluster; members: "
                        f"{[format_address(m.address) for m in self._cluster.members()]}")

    def _submit(self, fn, kind, args, kwargs, pinned, function=None, service=None) -> Future:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        function = function or self._function(fn)
        future: Future = Future()
        if service is None:
            task = _Task(next(self._ids), future, fn, function, kind, args, kwargs, pinned)
        else:
            task = _ServiceTask(next(self._ids), future, fn, function, kind, args, kwargs, pinned, service)
        future.add_done_callback(lambda done, task=task: done.cancelled() and self._cancelled(task))
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._outstanding += 1
            link, send_now = self._place(task)
        if link is not None:
            if send_now:
                self._flush(link)
            else:
                self._schedule_flush(link)
        return future

    def _function(self, fn) -> tuple:
        """``(function_id, pickled)`` for ``fn``, pickled once while it stays in the cache."""
        cached = self._functions.get(id(fn))
        if cached is not None and cached[0] is fn:
            return cached[1]
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        function = (next(self._function_ids), serialize.dumps_function(fn))
        with self._lock:
            self._functions[id(fn)] = (fn, function)  # holding fn keeps its id from being reused
            while len(self._functions) > _FUNCTION_CACHE:
                self._functions.popitem(last=False)
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
                self._backlog.append(task)
                return None, False
        was_idle = not link.in_flight
        self._assign(link, task)
        return link, was_idle

    def _least_loaded(self):
        """The link with the least work in flight per task thread, among those with credit."""
        best, best_load = None, None
        for link in self._links.values():
            if link.spare() <= 0:
                continue
            load = len(link.in_flight) / max(1, link.member.workers)
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
                if task.future.set_running_or_notify_cancel():
                    why = f" ({task.lost})" if task.lost else ""
                    task.future.set_exception(WorkerCrashed(
                        f"task {task.describe()} cannot run: no remaining member offers service {name!r}{why}; "
                        f"the services offered now are {offered or 'none'}; start a member that offers it"))

    def _assign(self, link: _Link, task: _Task) -> None:
        task.link = link
        link.in_flight[task.id] = task
        link.outbox.append(task)

    def _refill(self, link: _Link) -> bool:
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

    def _refill_services(self, link: _Link) -> bool:
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

    def _fail_pinned(self, task: _Task) -> None:
        self._finish_outstanding(1)
        if task.future.set_running_or_notify_cancel():
            task.future.set_exception(WorkerCrashed(
                f"task {task.describe()} was pinned to a member that is no longer in the cluster"))

    # -- sending ------------------------------------------------------------------------------------------

    def _schedule_flush(self, link: _Link) -> None:
        with self._lock:
            if link.flush_pending:
                return
            link.flush_pending = True
        self._transport.call_soon(self._flush, link)

    def _flush(self, link: _Link) -> None:
        """Send what is in ``link``'s outbox as one frame (functions first sent once per link)."""
        with link.send_lock:
            with self._lock:
                tasks, link.outbox = link.outbox, []
                link.flush_pending = False
            if not tasks or link.closed:
                return
            functions, wire_tasks = [], []
            for task in tasks:
                if task.function_id not in link.sent_functions:
                    link.sent_functions.add(task.function_id)
                    functions.append((task.function_id, task.pickled))
                wire_tasks.append((task.id, task.function_id, task.kind, serialize.wrap_buffers(task.args),
                                   task.kwargs))
            try:
                parts = serialize.dumps_parts(("tasks", (functions, wire_tasks)))
            except Exception:
                parts = self._drop_unpicklable(link, tasks, functions)
                if parts is None:
                    return
            try:
                link.conn.send_frame(Kind.MESSAGE, parts if len(parts) > 1 else parts[0])
            except GridError as exc:
                log.debug("sending to %s failed (%s); its tasks are retried when the link closes", link.member, exc)

    def _drop_unpicklable(self, link: _Link, tasks, functions):
        good = []
        for task in tasks:
            try:
                serialize.dumps_parts((task.args, task.kwargs))
            except Exception as exc:
                with self._lock:
                    link.in_flight.pop(task.id, None)
                    self._finish_outstanding(1)
                if task.future.set_running_or_notify_cancel():
                    task.future.set_exception(exc)
            else:
                good.append((task.id, task.function_id, task.kind, task.args, task.kwargs))
        if not good:
            link.sent_functions.difference_update(function_id for function_id, _ in functions)
            return None
        return serialize.dumps_parts(("tasks", (functions, good)))

    def _cancelled(self, task: _Task) -> None:
        """A Future was cancelled: drop the task, or tell its member to skip it."""
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
                return
        try:
            messaging.send(link.conn, "cancel", [task.id])
        except GridError:
            pass

    # -- results (IO thread) ----------------------------------------------------------------------------------

    def _on_results(self, conn, results) -> None:
        link = conn.attachment
        finished = []
        with self._lock:
            for task_id, status, value, seconds in results:
                task = link.in_flight.pop(task_id, None)
                if task is None:
                    continue
                finished.append((task, status, value, seconds))
                if status != CANCELLED:  # per task, chunks too: the credit counts tasks
                    link.average = seconds if link.average is None else 0.8 * link.average + 0.2 * seconds
            self._finish_outstanding(len(finished))
            more = self._refill(link)
        for task, status, value, seconds in finished:
            _complete(task, status, value, seconds)
        if more:
            self._flush(link)

    def _finish_outstanding(self, count: int) -> None:
        if count:
            self._outstanding -= count
            if self._outstanding == 0:
                self._all_done.notify_all()

    def _on_link_closed(self, conn) -> None:
        link = conn.attachment
        if not isinstance(link, _Link):
            return
        with self._lock:
            link.closed = True
            if self._links.get(link.member.uuid) is link:
                del self._links[link.member.uuid]
            orphans = sorted(link.in_flight.values(), key=operator.attrgetter("id"))
            link.in_flight.clear()
            pinned = list(link.pinned)
            link.pinned.clear()
            retry, failed, retry_services = [], [], []
            for task in orphans:
                task.attempts += 1
                task.link = None
                if task.future.cancelled():
                    self._finish_outstanding(1)
                elif task.pinned is None and task.attempts <= self._max_retries:
                    if task.service is None:
                        retry.append(task)
                    else:
                        task.lost = (f"member {link.member}, which ran it, was lost: "
                                     f"{conn.farewell or conn.close_reason}")
                        retry_services.append(task)
                else:
                    failed.append(task)
            self._backlog.extendleft(reversed(retry))
            for task in reversed(retry_services):  # first in line again, in their order
                self._service_backlog.setdefault(task.service, collections.deque()).appendleft(task)
            retry += retry_services
            refilled = [other for other in self._links.values() if self._refill(other)]
        if self._shutdown and not orphans:
            return
        if orphans or pinned:
            log.warning("member %s was lost with %d tasks in flight (%s); %d will run elsewhere",
                        link.member, len(orphans), conn.close_reason, len(retry))
        if failed or pinned:
            report = self._embedded.exit_report(link.member.address, timeout=0.5) if self._embedded else None
            cause = report or f"the connection was lost ({conn.farewell or conn.close_reason})"
            with self._lock:
                self._finish_outstanding(len(failed) + len(pinned))
            for task in failed + pinned:
                if task.future.set_running_or_notify_cancel():
                    attempts = (f"after {task.attempts} attempts (max_retries={self._max_retries})"
                                if task.pinned is None else "(it was pinned to that member)")
                    task.future.set_exception(WorkerCrashed(
                        f"task {task.describe()} failed {attempts}: member {link.member} was lost while "
                        f"running it: {cause}"))
        for other in refilled:
            self._flush(other)
        if not self._shutdown and any(m.uuid == link.member.uuid for m in self._cluster.members()):
            self._open_link(link.member)  # the link broke but the member is still listed: link again
        if self._service_backlog:
            with self._lock:  # after _open_link: a member being linked again may still run them
                self._fail_unservable()

    # -- map --------------------------------------------------------------------------------------------------

    def map(self, fn, *iterables, timeout=None, chunksize=None):
        """Like ``map(fn, *iterables)``, run on the members; lazy, ordered, bounded in memory.

        Args:
            timeout: seconds from this call until each next result must be ready
                (``TimeoutError`` otherwise).
            chunksize: items per task; None picks it from measured task times.

        Returns:
            An iterator of results; a task's exception is raised where iteration reaches it.
        """
        end = None if timeout is None else time.monotonic() + timeout
        return _ordered_results(self._chunk_futures(fn, iterables, chunksize), end)

    def map_unordered(self, fn, *iterables, chunksize=None):
        """Like ``map`` but yields results as they complete (the order is lost)."""
        return self._unordered(fn, iterables, chunksize)

    def _unordered(self, fn, iterables, chunksize):
        chunks = self._chunk_futures(fn, iterables, chunksize, ordered=False)
        try:
            for future in chunks:
                values, error = future.result()[:2]
                yield from values
                if error is not None:
                    raise error
        finally:
            chunks.close()

    def _chunk_futures(self, fn, iterables, chunksize, *, ordered=True, service=None):
        """Submit chunks as the caller consumes; yield chunk futures (in order, or as completed)."""
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        function = self._function(fn)
        # One iterable: chunks of the items themselves, no 1-tuples to build and pickle.
        kind, items = (CHUNK1, iter(iterables[0])) if len(iterables) == 1 else (CHUNK, zip(*iterables))
        sizer = _ChunkSizer(chunksize, _length_hint(iterables), self)
        pending: collections.deque = collections.deque()
        exhausted = False

        def top_up():
            nonlocal exhausted
            window = sizer.window()
            while not exhausted and len(pending) < window:
                chunk = list(itertools.islice(items, sizer.size()))
                if not chunk:
                    exhausted = True
                    return
                future = self._submit(fn, kind, chunk, None, None, function, service)
                future.items = len(chunk)
                future.add_done_callback(sizer.observe_future)  # result: (values, error, seconds)
                pending.append(future)

        top_up()  # start at once, like the stdlib's map; the rest as results are consumed

        def generate():
            try:
                while pending:
                    if ordered:
                        future = pending.popleft()
                    else:
                        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                        future = next(f for f in pending if f in done)
                        pending.remove(future)
                    yield future
                    top_up()
            finally:
                for future in pending:
                    future.cancel()

        return generate()

    def capacity(self) -> int:
        """Tasks this executor keeps in flight across all members right now."""
        with self._lock:
            return sum(link.credit for link in self._links.values()) or 1

    def _task_threads(self) -> int:
        with self._lock:
            return sum(max(1, link.member.workers) for link in self._links.values()) or 1

    # -- shutting down -------------------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; with ``wait``, block until submitted work is done, then release
        the links, the transport and (if this executor made it) the cluster.

        Args:
            cancel_futures: cancel every future that has not finished.
        """
        with self._lock:
            self._shutdown = True
            tasks = list(self._backlog)
            for waiting in self._service_backlog.values():
                tasks.extend(waiting)
            if cancel_futures:
                for link in self._links.values():
                    tasks.extend(link.in_flight.values())
                    tasks.extend(link.pinned)
        if cancel_futures:
            for task in tasks:
                task.future.cancel()
        closer = getattr(self, "_closer", None)
        if not wait:
            if closer is None:
                self._closer = threading.Thread(target=self._close_when_done, name="grid-executor-shutdown")
                self._closer.start()  # joined by a later shutdown(wait=True), or at interpreter exit
            return
        self._close_when_done()
        if closer is not None and closer is not threading.current_thread():
            closer.join()

    def _close_when_done(self) -> None:
        with self._lock:
            while self._outstanding > 0:
                self._all_done.wait(0.1)
        self._teardown()

    def _teardown(self) -> None:
        with self._lock:
            if getattr(self, "_torn_down", False):
                return
            self._torn_down = True
            self._shutdown = True
        forget_at_exit(self)
        try:
            self._cluster.remove_membership_listener(self._on_membership)
        except Exception:
            pass
        self._transport.close()
        self._close_cluster()

    def _close_cluster(self) -> None:
        if self._owns_cluster:
            self._cluster.close()
        if self._embedded is not None:
            self._embedded.close()

    def __exit__(self, *exc_info):
        self.shutdown(wait=True)
        return False


class _ChunkSizer:
    """Chooses map chunk sizes from measured task times, and how many chunks to keep in flight."""

    def __init__(self, chunksize, length, executor: GridExecutor):
        self.fixed = chunksize
        self.length = length
        self.executor = executor
        self.current = chunksize or 1
        self.per_item = None

    def size(self) -> int:
        if self.fixed:
            return self.fixed
        return self.current

    def window(self) -> int:
        """Chunks to keep submitted: twice what the members keep in flight of chunks this size.

        Sized from the chunk's expected time, not the links' credit, which lags while
        chunks grow: items submitted ahead stay bounded whatever the chunk size.
        """
        if not self.fixed:  # growing chunks aim at _CHUNK_TARGET each: two per task thread suffice
            return max(4, 2 * self.executor._task_threads() * _MIN_CREDIT)
        seconds = None if self.per_item is None else self.per_item * self.size()
        return max(4, 2 * self.executor._task_threads() * _credit_per_worker(seconds))

    def observe_future(self, future: Future) -> None:
        """A chunk's Future is done: learn from its member time (a failed chunk teaches nothing)."""
        if not future.cancelled() and future.exception() is None:
            self.observe(getattr(future, "items", 0), future.result()[2])

    def observe(self, items: int, seconds: float) -> None:
        if items <= 0:
            return
        per_item = max(seconds / items, 1e-7)
        self.per_item = per_item if self.per_item is None else 0.7 * self.per_item + 0.3 * per_item
        if self.fixed:
            return
        ideal = _CHUNK_TARGET / self.per_item
        limit = _MAX_CHUNK
        if self.length:
            members = max(1, len(self.executor._links))
            limit = max(1, min(limit, math.ceil(self.length / (4 * members))))
        self.current = int(max(1, min(ideal, 4 * self.current, limit)))


def _ordered_results(chunks, end: float | None):
    """The values of chunk futures, in order; each next one due by ``end`` (monotonic), if given."""
    try:
        for future in chunks:
            remaining = None if end is None else end - time.monotonic()
            values, error = future.result(remaining)[:2]
            yield from values
            if error is not None:
                raise error
    finally:
        chunks.close()


def _complete(task: _Task, status, value, seconds) -> None:
    future = task.future
    if status == CANCELLED:
        future.cancel()
        return
    if not future.set_running_or_notify_cancel():
        return
    if task.kind != CALL:
        if status == OK:
            future.set_result((value, None, seconds))
        elif status == UNSENDABLE:
            future.set_result(([], _unpack_error(value), seconds))
        else:
            values, packed = value
            future.set_result((values, _unpack_error(packed), seconds))
        return
    if status == OK:
        future.set_result(value)
    else:
        future.set_exception(_unpack_error(value))


def _unpack_error(packed) -> BaseException:
    """The exception a task raised, from the worker's ``(pickled exception, traceback text)``."""
    pickled, text = packed
    try:
        exc = serialize.loads(pickled)
    except Exception as error:  # say, a class whose __init__ does not take its own args
        raised = text.rstrip().splitlines()[-1] if text.strip() else "an exception"
        exc = RemoteError(f"the task raised {raised}, but that exception cannot be unpickled here "
                          f"({type(error).__name__}: {error}); make it picklable (its __reduce__ must "
                          "rebuild it) and its class importable where the executor runs")
    if not isinstance(exc, BaseException):
        exc = RemoteError(str(exc))
    exc.__cause__ = RemoteTraceback(text)
    return exc


def _length_hint(iterables) -> int | None:
    hints = [operator.length_hint(iterable, -1) for iterable in iterables]
    if not hints or any(hint < 0 for hint in hints):
        return None
    return min(hints)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."




# -- the default connection's executor ----------------------------------------------------------------

_default_executor: GridExecutor | None = None
_default_lock = threading.Lock()


def default_executor() -> GridExecutor:
    """The executor of the default connection: the configured cluster, or an embedded one."""
    global _default_executor
    with _default_lock:
        if _default_executor is None or _default_executor._shutdown:
            from .client import cluster

            config = load_config()
            _default_executor = GridExecutor() if config.source == "defaults" else GridExecutor(cluster=cluster())
        return _default_executor


def fmap(fn, *iterables, chunksize=None):
    """``map`` on the default connection's executor: lazy, ordered, bounded in memory."""
    return default_executor().map(fn, *iterables, chunksize=chunksize)


def ufmap(fn, *iterables, chunksize=None):
    """Like ``fmap`` but yields results as they complete."""
    return default_executor().map_unordered(fn, *iterables, chunksize=chunksize)
