"""ClusterExecutor: a ``concurrent.futures.Executor`` whose workers are the members of a cluster.

::

    caller threads                                   IO thread ("grid-io-executor"), queueing for
    --------------                                   completions.py (a waiting caller, or "grid-results")
    submit(fn, *args) -> Future                      "results" from a member:
      pick the least-loaded link with credit           futures resolved, credit freed,
      idle link: send now, from this thread            backlog handed to the freed link
      busy link: queue; sent in one frame later      a link drops or its member leaves:
    map(fn, *its): chunks submitted as results         its in-flight tasks go back to the
      are consumed; yields in order                    backlog (at most max_retries times)
    submit_service(name, *args): the same, but       a link opens: ask its member which
      only links whose member offers ``name``          services it offers ("services")
      (a miss asks every member again, then         no link left for failure_timeout: what
      raises ServiceNotFound); waits in its own        waits fails, and so does a submit until
      backlog per name                                 a link opens again

No central scheduler: this process sends work to each member directly, keeping a
credit window per member (bounded work in flight), so ``map`` over an endless
iterable runs in bounded memory. A function travels once per link and is then
named by its id; tiny tasks share frames both ways. A service task is an ordinary
task running ``services.call_service(name, ...)``, placed only on members that
offer ``name`` (and re-run only on those if its member dies).

This file is the Executor itself: its links to members as members come and go, failover
when a link is lost, what services the members offer, and shutting down. Placing,
sending and completing tasks (the per-task path) is its base class, ``Dispatcher``, in
``dispatch.py``; ``map``'s lazy chunking is in ``mapping.py``.

It is handed the cluster it runs on (anything with ``config``, ``members()`` and
membership listeners: a ``grid.Cluster``) and never makes one. Turning
``cluster=None`` into the configured or an embedded cluster, and closing what it
opened, is the job of ``grid.GridExecutor`` at the top (``grid/client.py``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import operator
import threading
import time
from concurrent.futures import Future
from typing import Protocol

from ..cluster.config import Config
from ..cluster.members import local_target
from ..cluster.partitions import partition_of
from ..errors import BrokenGrid, GridError, NotConnected, ServiceNotFound, WorkerCrashed
from ..net import messaging, serialize
from ..net.address import format_address
from ..net.transport import Transport
from .dispatch import Dispatcher, Link, fail
from . import reduce
from .mapping import MapRun, map_results
from .progress import total_of, with_progress
from .completions import plain
from .protocol import CALL, FAILED, OK
from .services import HOW_TO_OFFER, call_service

log = logging.getLogger("grid.executor")


class MemberList(Protocol):
    """What an executor needs of the cluster it runs on (a ``grid.Cluster`` is one)."""

    config: Config

    def members(self) -> list: ...

    def partitions(self): ...  # the partition table (PartitionTable)

    def add_membership_listener(self, listener) -> None: ...

    def remove_membership_listener(self, listener) -> None: ...


class ClusterExecutor(Dispatcher, concurrent.futures.Executor):
    """Run callables on the members of the cluster it is handed; returns stdlib ``Future``s.

    ``grid.GridExecutor`` is this with the cluster found for it; use that one.

    Args:
        cluster: the cluster it runs on (a ``MemberList``: a ``grid.Cluster``); not closed here.
        initializer, initargs: ``initializer(*initargs)`` runs once on every member
            before it takes this executor's work.
        max_retries: how often a task is re-run after the member running it died.
        startup_timeout: seconds to wait for the first links to members.
        crash_report: ``crash_report(address, timeout=, uuid=)`` says how the member process
            ``uuid`` at ``address`` ended (exit code, last log lines), for the error of a task it
            took down.
        on_teardown: called once when the executor has let go of its links (at the end of a
            shutdown, or when ``__init__`` fails): the owner closes what it opened for it.

    Raises:
        NotConnected: no member of the cluster could be reached.
    """

    def __init__(self, cluster: MemberList, *, initializer=None, initargs=(), max_retries: int = 3,
                 startup_timeout: float = 30.0, crash_report=None, on_teardown=None):
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        super().__init__()  # the Dispatcher's state: the lock, the links, the backlogs
        self._max_retries = max_retries
        self._service_functions: dict[str, functools.partial] = {}  # name -> call_service bound to it
        self._crash_report = crash_report
        self._on_teardown = on_teardown
        self._cluster = cluster
        self._maps: set = set()  # open maps (mapping.MapRun): shutdown waits for them
        self._drainers: list[threading.Thread] = []  # threads running maps nobody reads to the end
        try:
            self._init = None if initializer is None else serialize.dumps((initializer, tuple(initargs)))
        except BaseException:
            self._release()
            raise
        config = cluster.config
        self._router = messaging.Router()
        self._router.register("results", self._results_arrived, any_thread=True)
        try:
            self._transport = Transport(
                cluster_id=config.id, secret=config.resolved_secret(), info={"role": "executor"},
                on_frame=self._router.on_frame, on_close=self._link_closed,
                handshake_timeout=config.handshake_timeout, tls=config.tls, name="grid-io-executor",
                max_payload=config.max_frame_bytes)
        except BaseException:
            self._release()
            raise
        self._cluster.add_membership_listener(self._on_membership)
        for member in self._cluster.members():
            self._open_link(member)
        self._await_links(startup_timeout)

    # -- setting up ---------------------------------------------------------------------------------

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

    # -- links to members, as members come and go (handled where results are: completions.py) ----------

    def _open_link(self, member) -> None:
        with self._lock:
            if member.uuid in self._links or member.uuid in self._connecting or self._shutdown:
                return
            self._connecting.add(member.uuid)
        future = self._transport.connect(local_target(member))
        # Handled off the IO thread, as results are: failing a pinned task runs its callbacks.
        future.add_done_callback(lambda done: self._completions.put(self._link_opened, member, done))

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
            link = Link(member, conn)
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
            self._starved = False
            if self._starve_timer is not None:
                self._starve_timer.cancel()
                self._starve_timer = None
            self._refill(link)
            self._all_done.notify_all()
        if self._link_reader.lend(conn):  # read from now on by whoever waits for its results
            self._completions.links_lent()
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
        self._note_no_links()
        self._all_done.notify_all()

    def _on_membership(self, event) -> None:
        if event.kind == "joined":
            self._open_link(event.member)
            return
        with self._lock:
            link = self._links.get(event.member.uuid)
        if link is not None:
            link.conn.close(f"member {event.member} left the cluster")

    def _results_arrived(self, conn, results) -> None:
        """(The thread that read them: a waiting caller, the results thread, or the IO thread for a
        TLS link) a member's results: completed here if that runs no user code (plain values,
        Futures without user callbacks), else queued for a waiting caller or the results thread."""
        link = conn.attachment
        if type(results) is list and isinstance(link, Link) and all(_plain_result(link, r) for r in results):
            self._on_results(conn, results)
        else:
            self._completions.put(self._on_results, conn, _detached(results))

    def _link_closed(self, conn) -> None:
        """(IO thread) after the results that came before it, the link's tasks are taken care of."""
        self._completions.put(self._on_link_closed, conn)

    def _on_link_closed(self, conn) -> None:
        """A link closed: its tasks in flight run elsewhere (up to ``max_retries`` times) or fail."""
        link = conn.attachment
        if not isinstance(link, Link):
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
            lost = (link.member, conn.farewell or conn.close_reason)
            for task in orphans:
                task.attempts += 1
                task.link = None
                task.deaths += (lost,)
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
            report = (self._crash_report(link.member.address, timeout=0.5, uuid=link.member.uuid)
                      if self._crash_report else None)
            cause = report or f"the connection was lost ({conn.farewell or conn.close_reason})"
            with self._lock:
                self._finish_outstanding(len(failed) + len(pinned))
            reports = {link.member.uuid: report}
            for task in failed:
                if not task.future.done():
                    attempts = (f"after {task.attempts} attempts (max_retries={self._max_retries})"
                                if task.pinned is None else "(it was pinned to that member)")
                    fail(task.future, WorkerCrashed(
                        f"task {task.describe()} failed {attempts}: {self._describe_deaths(task, reports)}"))
            for task in pinned:
                fail(task.future, WorkerCrashed(
                    f"task {task.describe()} failed (it was pinned to that member): member {link.member} "
                    f"was lost before it ran: {cause}"))
        for other in refilled:
            self._flush(other)
        if not self._shutdown and any(m.uuid == link.member.uuid for m in self._cluster.members()):
            self._open_link(link.member)  # the link broke but the member is still listed: link again
        with self._lock:
            if self._service_backlog:  # after _open_link: a member being linked again may still run them
                self._fail_unservable()
            self._note_no_links()

    def _describe_deaths(self, task, reports: dict) -> str:
        """Each member lost while it ran ``task``: how its process ended (when known) or why the link
        closed. ``reports`` memoizes crash reports by member uuid across the tasks of one failure."""
        lines = []
        for number, (member, reason) in enumerate(task.deaths, 1):
            last = number == len(task.deaths)  # the others ended a while ago: no need to wait for them
            if member.uuid not in reports:
                reports[member.uuid] = (self._crash_report(member.address, timeout=0.5 if last else 0.05,
                                                           uuid=member.uuid) if self._crash_report else None)
            report = reports[member.uuid]
            if report and not last:
                report = report.splitlines()[0]
            lines.append(f"({number}) member {member} was lost while running it: "
                         f"{report or f'the connection was lost ({reason})'}")
        return "\n".join(lines)

    # -- no member left ----------------------------------------------------------------------------------

    def _note_no_links(self) -> None:
        """(Under self._lock) with no link left, waiting tasks fail after failure_timeout unless one opens."""
        if self._links or self._shutdown or self._starve_timer is not None:
            return
        self._starve_timer = self._transport.call_later(self._cluster.config.failure_timeout,
                                                        self._completions.put, self._starve)

    def _starve(self) -> None:
        """No link for failure_timeout: fail what waits (and, until a link opens, what is submitted)."""
        with self._lock:
            self._starve_timer = None
            if self._links or self._shutdown:
                return
            self._starved = True
            waiting = list(self._backlog)
            self._backlog.clear()
            for tasks in self._service_backlog.values():
                waiting.extend(tasks)
            self._service_backlog.clear()
            self._finish_outstanding(len(waiting))
        if waiting:
            log.error("no member of the cluster has been reachable for %.1f s; %d waiting tasks failed",
                      self._cluster.config.failure_timeout, len(waiting))
        reports: dict = {}
        for task in waiting:
            if not task.future.done():
                fail(task.future, self._starved_error(task, reports))

    def _starved_error(self, task, reports: dict | None = None) -> BrokenGrid:
        why = (f"task {task.describe()} cannot run: no member of the cluster has been reachable for "
               f"{self._cluster.config.failure_timeout} s (failure_timeout); start members (`python -m grid peer`) "
               "or check the cluster, then submit again")
        if task.deaths:
            return WorkerCrashed(f"{why}; before that, members were lost while running it:\n"
                                 f"{self._describe_deaths(task, {} if reports is None else reports)}")
        return BrokenGrid(why)

    # -- submitting -----------------------------------------------------------------------------------

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on the least loaded member; returns a Future.

        Raises:
            RuntimeError: the executor is shut down.
            SerializationError: ``fn`` cannot travel (a lambda without cloudpickle).
        """
        return self.submit_task(fn, CALL, args, kwargs, None)

    def submit_to_member(self, member, fn, /, *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on ``member`` (a Member, its uuid or its "host:port").

        The Future fails with ``WorkerCrashed`` if that member dies or leaves first.
        """
        return self.submit_task(fn, CALL, args, kwargs, self._resolve_member(member).uuid)

    def submit_to_key_owner(self, key, fn, /, *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on the member that owns ``key``'s partition (by the table now),
        where ``grid.cluster().get_map(name)[key]`` reads without a hop.

        The Future fails with ``WorkerCrashed`` if that member dies or leaves first.

        Raises:
            TypeError: ``key`` cannot be a key (a set or dict in it, or it cannot be pickled).
            GridError: no member holds data (every member is ``data = false``, or none joined yet).
        """
        table = self._cluster.partitions()
        partition = partition_of(key, table.partitions)
        owner = table.owner(partition) if table.replicas else None
        if owner is None:
            raise GridError(f"no member owns partition {partition} yet (no data members in the table of version "
                            f"{table.version}): start a member with data = true, or use submit()")
        return self.submit_task(fn, CALL, args, kwargs, self._resolve_member(owner).uuid)

    def submit_to_all(self, fn, /, *args, **kwargs) -> dict:
        """Run ``fn(*args, **kwargs)`` once on every current member; returns ``{member: Future}``."""
        return {member: self.submit_task(fn, CALL, args, kwargs, member.uuid) for member in self.members()}

    def members(self) -> list:
        """The members this executor can send work to."""
        return self._cluster.members()

    def _resolve_member(self, member):
        for candidate in self._cluster.members():
            if member in (candidate, candidate.uuid, format_address(candidate.address), candidate.address):
                return candidate
        raise GridError(f"{member!r} is not a member of the cluster; members: "
                        f"{[format_address(m.address) for m in self._cluster.members()]}")

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
        self.check_open()
        function = self._check_service(name)
        return self.submit_task(function, CALL, args, kwargs, None, service=name)

    def map_service(self, name: str, /, *iterables, timeout=None, chunksize=None):
        """Like ``map(service, *iterables)``, run only on members offering the service ``name``.

        Lazy, ordered and bounded in memory like ``map``; fails over like ``submit_service``.

        Raises:
            ServiceNotFound: no member offers ``name`` (raised here, before any item is taken).
        """
        self.check_open()
        function = self._check_service(name)
        return map_results(MapRun(self, function, iterables, chunksize, service=name), timeout)

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

    def _ask_services(self, link: Link) -> Future | None:
        """Ask ``link``'s member which services it offers; the answer is learnt where results are."""
        try:
            asked = messaging.request(link.conn, "services", None)
        except GridError:
            return None  # the link is closing: _on_link_closed takes care of its tasks
        asked.add_done_callback(lambda done: self._completions.put(self._services_answered, link, done))
        return asked

    def _services_answered(self, link: Link, done: Future) -> None:
        error = GridError("the request was cancelled") if done.cancelled() else done.exception()
        if error is not None and not link.closed:
            log.info("member %s did not say which services it offers (%s); it gets no service tasks",
                     link.member, error)
        self._learn_services(link, () if error is not None else done.result())

    def _learn_services(self, link: Link, names) -> None:
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
        concurrent.futures.wait([request for _, request in asked], timeout=self._cluster.config.handshake_timeout)
        for link, request in asked:  # learnt here too: a Future wakes its waiters before its callbacks run
            if request.done() and not request.cancelled() and request.exception() is None:
                self._learn_services(link, request.result())

    # -- map --------------------------------------------------------------------------------------------------

    def map(self, fn, *iterables, timeout=None, chunksize=None, progress=False):
        """Like ``map(fn, *iterables)``, run on the members; lazy, ordered, bounded in memory.

        Args:
            timeout: seconds from this call until each next result must be ready
                (``TimeoutError`` otherwise).
            chunksize: items per task; None picks it from measured task times.
            progress: draw a progress bar on stderr as the results are taken (tqdm's if it is
                installed); sized inputs show how many of how many.

        Returns:
            An iterator of results; a task's exception is raised where iteration reaches it.
        """
        results = map_results(MapRun(self, fn, iterables, chunksize), timeout)
        return with_progress(results, total_of(iterables)) if progress else results

    def map_reduce(self, map_fn, reduce_fn, iterable, *, initial=reduce.MISSING, chunksize=None):
        """``functools.reduce(reduce_fn, map(map_fn, iterable), initial)``, run on the members: each chunk
        is mapped and reduced there, and the partial results are combined by a tree of reduces there;
        only the one value comes back. ``reduce_fn`` must be associative (sum, max, concatenation: the
        order is kept, so it need not be commutative). A range is cut into sub-ranges, never made.

        Raises:
            TypeError: an empty iterable and no ``initial`` (as functools.reduce).
        """
        return reduce.map_reduce(self, map_fn, reduce_fn, iterable, initial, chunksize)

    def map_unordered(self, fn, *iterables, chunksize=None, progress=False):
        """Like ``map`` but yields results as they complete (the order is lost)."""
        results = map_results(MapRun(self, fn, iterables, chunksize, ordered=False), None)
        return with_progress(results, total_of(iterables)) if progress else results

    # Open maps (mapping.MapRun calls these): shutdown finishes them.

    def map_opened(self, run: MapRun) -> None:
        with self._lock:
            self._maps.add(run)

    def map_closed(self, run: MapRun) -> None:
        with self._lock:
            self._maps.discard(run)

    def map_detached(self, run: MapRun) -> None:
        """A map nobody reads any more, given items that have not run: they run in the background."""
        drainer = threading.Thread(target=run.drain, name="grid-map")
        with self._lock:
            self._drainers = [thread for thread in self._drainers if thread.is_alive()] + [drainer]
        drainer.start()

    def capacity(self) -> int:
        """Tasks this executor keeps in flight across all members right now."""
        with self._lock:
            return sum(link.credit for link in self._links.values()) or 1

    # -- shutting down -------------------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; with ``wait``, block until submitted work is done, then release
        the links, the transport and (if this executor made it) the cluster.

        Args:
            cancel_futures: cancel every future that has not started running (work already
                handed to a member runs to the end), as the stdlib's executors do.
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
            maps = list(self._maps)
            if not cancel_futures:
                for run in maps:  # their items were given before the shutdown: they still run (mapping.py)
                    run.past_shutdown()
        if cancel_futures:
            for run in maps:
                run.cancel_rest()
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
        try:
            with self._lock:
                maps, drainers = list(self._maps), list(self._drainers)
            for run in maps:
                run.drain()
            for drainer in drainers:
                drainer.join()
            # Helping: a waiter completes what came, and one on the results thread (shutdown from
            # a done-callback) must, since nothing else would.
            while not self._completions.wait(None, lambda: self._outstanding <= 0, 0.1):
                pass  # (woken when the count reaches 0; the timeout is a backstop, as before)
        except BaseException:  # Ctrl-C while waiting: stop now, so one Ctrl-C ends the program
            self.abandon("shutdown was interrupted")
            raise
        self._teardown()

    def abandon(self, why: str) -> None:
        """Stop at once without waiting for work: every unfinished Future is cancelled (members
        are told to skip what they have not started), then the links and what the executor
        opened are released. For exits that must not wait (Ctrl-C)."""
        with self._lock:
            self._shutdown = True
            tasks = list(self._backlog)
            for waiting in self._service_backlog.values():
                tasks.extend(waiting)
            for link in self._links.values():
                tasks.extend(link.in_flight.values())
                tasks.extend(link.pinned)
            maps = list(self._maps)
        for run in maps:
            run.close()
        unfinished = [task for task in tasks if not task.future.done()]
        if unfinished:
            log.warning("%s: %d unfinished tasks are cancelled", why, len(unfinished))
        running: dict = {}
        for task in unfinished:
            if not task.future.cancel():  # it runs on a member: tell it to skip it, fail the Future
                if task.link is not None:
                    running.setdefault(task.link, []).append(task.id)
                fail(task.future, BrokenGrid(f"task {task.describe()} was abandoned: {why}"))
        for link, ids in running.items():
            try:
                messaging.send(link.conn, "cancel", ids)
            except GridError:
                pass
        self._teardown()

    def _teardown(self) -> None:
        with self._lock:
            if self._torn_down:
                return
            self._torn_down = True
            self._shutdown = True
        try:
            self._cluster.remove_membership_listener(self._on_membership)
        except Exception:
            pass
        self._transport.close()
        self._release()

    def _release(self) -> None:
        self._completions.close()  # what came before the transport closed is completed first
        self._link_reader.close()
        on_teardown, self._on_teardown = self._on_teardown, None
        if on_teardown is not None:
            on_teardown()

    def __exit__(self, *exc_info):
        self.shutdown(wait=True)
        return False


def _plain_result(link: Link, result) -> bool:
    """Whether completing ``result`` runs no user code: a plain value for a Future without user callbacks."""
    try:
        task_id, status, (pickled, buffers), _ = result
    except (TypeError, ValueError):
        return False  # failures (user exceptions to unpickle), malformed ones: off the IO thread
    task = link.in_flight.get(task_id)
    if task is None:
        return True  # not waited for (cancelled, or retried elsewhere): nothing to complete
    return (status == OK and not buffers and type(pickled) is bytes and not task.future.user_callbacks
            and plain(pickled))


def _detached(results):
    """``results`` with their out-of-band buffers copied out of the frame, now.

    They are views of the link's receive buffer, which the next large frame reuses once
    nothing refers to it: a result waiting in the queue would make it allocate fresh memory.
    The copy is the one unpickling would make (a ``bytes`` buffer is then taken as it is).
    """
    if type(results) is not list:
        return results
    detached = []
    for result in results:
        try:
            task_id, status, value, seconds = result
            values = value[0] if status == FAILED else value
            pickled, buffers = values
        except (TypeError, ValueError):
            detached.append(result)
            continue
        if not buffers or type(buffers) is not list:
            detached.append(result)
            continue
        values = (pickled, [bytes(buffer) for buffer in buffers])
        detached.append((task_id, status, (values, value[1]) if status == FAILED else values, seconds))
    return detached
