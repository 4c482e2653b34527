"""The user's handles: ``Cluster`` (``connect()``, the process-wide ``cluster()``) and ``GridExecutor``.

A ``Cluster`` is either a client (it talks to the members over one
authenticated link and follows the member list they push) or, with
``member=True``, a full member running in this process.

``GridExecutor`` is ``compute``'s ``ClusterExecutor`` with its cluster found for it: the
one given, the configured one, or an embedded local one torn down with it. The
functions of the default connection (``fmap``, ``run_all``, ``exec_all``, ...) run on
``default_executor()``'s cluster. Interpreter exit closes every handle still open,
newest first.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from concurrent.futures import Future

from .cluster.config import Config, load_config
from .cluster.link import ClusterLink
from .cluster.members import Member, local_target
from .cluster.partitions import PartitionTable, partition_of
from .cluster.partitions import width as partition_width
from .code import livecode, patches
from .data import processing
from .data.counter import Counter
from .data.dlist import DList
from .data.dmap import RESERVED_PREFIX, DMap
from .data.dqueue import DQueue
from .data.dset import DSet
from .data.multimap import MultiMap
from .data.sync import Lock, Semaphore, Session
from .data.topic import Topic
from .data.events import EventHub
from .data.remote import RemoteBackend
from .data.store import SplitBrainProtection
from .compute.executor import ClusterExecutor
from .compute.services import ServiceProxy
from .errors import GridError, NotConnected, TransportError, WorkerCrashed
from .net import messaging, serialize
from .peer import Peer, running_peer

log = logging.getLogger("grid.client")

CATALOG = RESERVED_PREFIX + "catalog"  # the map of structure names to their kinds


class Cluster:
    """A handle on a cluster; use ``grid.connect()`` to make one.

    It is a context manager; ``close()`` leaves nothing running.
    """

    def __init__(self, config: Config, *, member: bool = False, timeout: float | None = None):
        self._start(config, member)
        self._owns_peer = member
        if member:
            self._peer = Peer(config)
            self._peer.start(timeout)
            self._link = None
        else:
            self._peer = None
            self._link = ClusterLink(config, timeout=timeout)
        close_at_exit(self, self.close)

    @classmethod
    def around(cls, peer: Peer) -> Cluster:
        """A member handle on ``peer``, a member already running in this process (closing the
        handle leaves the member running)."""
        handle = cls.__new__(cls)
        handle._start(peer.config, True)
        handle._owns_peer, handle._peer, handle._link = False, peer, None
        return handle

    def _start(self, config: Config, member: bool) -> None:
        """The state of a handle before it connects (either way: ``__init__`` or ``around``)."""
        self.config = config
        self.is_member = member
        self._closed = False
        self._executor = None
        self._executor_lock = threading.Lock()
        self._data = None  # the RemoteBackend of the structures, made on first use
        self._events = None  # its entry listeners (_HandleEvents), made on first use
        self._session = None  # its locks' and semaphores' leases (data.sync.Session), made on first use
        self._subscriptions: list = []  # its topics' subscribers, cancelled when it closes
        self._near_maps: dict[str, DMap] = {}  # maps with a near cache: one per name (each has a listener)
        self._claimed: dict[str, str] = {}  # structure names this handle saw in the catalog, and their kinds

    def members(self) -> list[Member]:
        """The current members, oldest (the master) first."""
        self._check_open()
        return list(self._peer.members() if self._peer else self._link.members)

    def master(self) -> Member | None:
        members = self.members()
        return members[0] if members else None

    def partitions(self) -> PartitionTable:
        """The partition table, as the master last pushed it: ``table.owner(p)`` and ``table.backups(p)``
        name each partition's members by uuid, ``table.version`` grows with every change, and
        ``partition_of(key)`` says which partition a key is in."""
        self._check_open()
        return self._peer.partitions() if self._peer else self._link.partition_table

    def partition_of(self, key) -> int:
        """The partition ``key`` is in, in this cluster (its table's count, which the master's config set)."""
        table = self.partitions()
        return partition_of(key, table.partitions if table.replicas else self.config.partitions)

    # -- distributed data -----------------------------------------------------------------------------

    def get_map(self, name: str, *, near_cache=False, ttl=None, max_idle=None, max_size=None) -> DMap:
        """The distributed map ``name`` (a ``MutableMapping``); see ``grid.data.dmap``.

        ``near_cache``: keep the entries this handle reads (True, or how many: 10,000 by default),
        dropped when their owners say they changed; this handle always reads its own writes.
        ``ttl``: seconds an entry lives after its write; ``max_idle``: seconds it lives after its
        last read or write; ``max_size``: entries the map keeps, the least recently used going
        first (each owner keeps its share). They apply to this handle's writes: open the map with
        the same ones wherever it is written.

        Raises:
            TypeError: ``name`` is a structure of another kind (a queue, a counter).
            ValueError: a limit that is not a positive number (or None).
        """
        if near_cache:
            with self._executor_lock:
                known = self._near_maps.get(name)
            if known is not None:
                return known
        structure = DMap(name, self._data_backend(), ttl=ttl, max_idle=max_idle, max_size=max_size,
                         near_cache=near_cache, runner=_ClusterRunner(self), events=self._event_hub)
        self._claim(name, "map")
        structure.on_destroy = lambda: self._forget_object(name)
        if near_cache:
            with self._executor_lock:
                structure = self._near_maps.setdefault(name, structure)
        return structure

    def _map_here(self, name: str) -> DMap:
        """A map on this handle, known to exist (a task's processor or query reads it here)."""
        return DMap(name, self._data_backend(), internal=True, runner=_ClusterRunner(self), events=self._event_hub)

    def _event_hub(self):
        self._check_open()
        with self._executor_lock:
            if self._events is None:
                if self._peer is not None:
                    self._events = _HandleEvents(self._peer.event_hub(), owned=False)
                else:
                    link = self._link
                    self._events = _HandleEvents(EventHub(transport=link.transport, router=link.router,
                                                          members=lambda: link.members), owned=True)
            return self._events

    def get_queue(self, name: str, maxsize: int = 0) -> DQueue:
        """The distributed queue ``name``, with ``queue.Queue``'s methods and errors."""
        structure = DQueue(name, self._data_backend(), maxsize)
        self._claim(name, "queue")
        structure.on_destroy = lambda: self._forget_object(name)
        return structure

    def get_counter(self, name: str) -> Counter:
        """The distributed counter ``name``: an int changed atomically, each change applied once."""
        structure = Counter(name, self._data_backend())
        self._claim(name, "counter")
        structure.on_destroy = lambda: self._forget_object(name)
        return structure

    def get_list(self, name: str) -> DList:
        """The distributed list ``name`` (a ``MutableSequence``), with list's methods and errors."""
        structure = DList(name, self._data_backend())
        self._claim(name, "list")
        structure.on_destroy = lambda: self._forget_object(name)
        return structure

    def get_set(self, name: str) -> DSet:
        """The distributed set ``name`` (a ``MutableSet``), with set's methods and errors; its
        operators return plain sets."""
        structure = DSet(name, self._data_backend())
        self._claim(name, "set")
        structure.on_destroy = lambda: self._forget_object(name)
        return structure

    def get_multimap(self, name: str) -> MultiMap:
        """The distributed multimap ``name``: keys with a list of values each, partitioned by key."""
        structure = MultiMap(name, self._data_backend())
        self._claim(name, "multimap")
        structure.on_destroy = lambda: self._forget_object(name)
        return structure

    def get_lock(self, name: str, *, reentrant: bool = False) -> Lock:
        """The distributed lock ``name``: ``threading.Lock``'s acquire/release/locked and ``with``;
        ``acquire`` returns a fencing token. Held by a lease this handle renews: a holder that dies,
        pauses or is cut off loses it after twice the cluster's ``failure_timeout``. ``reentrant``: its
        holder (a thread of this handle) may acquire it again, as an RLock."""
        structure = Lock(name, self._data_backend(), self._leases(), reentrant)
        self._claim(name, "lock")
        structure.on_destroy = lambda: self._forget_object(name)
        return structure

    def get_semaphore(self, name: str, permits: int = 1) -> Semaphore:
        """The distributed semaphore ``name``: ``threading.Semaphore``'s acquire/release (with ``n``).
        The first ``get_semaphore`` of a name sets its ``permits``; a handle's permits come back when
        it dies, pauses past twice the cluster's ``failure_timeout``, or closes."""
        Semaphore.check_permits(permits)
        self._claim(name, "semaphore")
        structure = Semaphore(name, self._data_backend(), self._leases(), permits)
        structure.on_destroy = lambda: self._forget_object(name)
        return structure

    def get_topic(self, name: str, *, reliable: bool = False, capacity: int | None = None) -> Topic:
        """The distributed topic ``name``: ``publish(msg)``, and ``subscribe(fn)`` (each subscriber gets
        every message once, in order, on a thread of its own). ``reliable``: a subscriber may start
        from a sequence the ring still holds (``start=``) and resume where it was. ``capacity``: the
        messages kept (10,000 reliable, 1,000 plain); a subscriber that falls further behind is told
        how many it lost (``on_loss``)."""
        structure = Topic(name, self._data_backend(), reliable=reliable, capacity=capacity)
        self._claim(name, "topic")
        structure.on_destroy = lambda: self._forget_object(name)
        structure.on_subscribe = self._subscribed
        return structure

    def _subscribed(self, subscription) -> None:
        with self._executor_lock:
            self._subscriptions = [s for s in self._subscriptions if s.active] + [subscription]

    def _leases(self) -> Session:
        backend = self._data_backend()
        with self._executor_lock:
            if self._session is None:
                # Twice the failure timeout: a holder goes on renewing through a failover of its
                # lock's owner (detection, promotion), and a dead one's locks are free soon after.
                self._session = Session(backend, 2 * self.config.failure_timeout)
            return self._session

    def objects(self) -> dict:
        """``{name: {"kind": kind, "size": size}}`` of every distributed structure on this cluster:
        a map's entries, a queue's, list's or set's items, a multimap's values, 1 for a counter (each
        size is asked of the owners)."""
        found = {}
        for name, kind in dict(self._catalog()).items():
            if kind == "map":
                size = len(DMap(name, self._data_backend(), internal=True))
            elif kind == "queue":
                size = DQueue(name, self._data_backend()).qsize()
            elif kind in ("list", "set", "multimap"):
                size = len({"list": DList, "set": DSet, "multimap": MultiMap}[kind](name, self._data_backend()))
            else:
                size = 1
            found[name] = {"kind": kind, "size": size}
        return found

    def _forget_object(self, name: str) -> None:
        """``destroy()``: the structure is gone, and so is its name in the catalog."""
        self._catalog().pop(name, None)
        self._claimed.pop(name, None)
        with self._executor_lock:
            self._near_maps.pop(name, None)

    def _catalog(self) -> DMap:
        return DMap(CATALOG, self._data_backend(), internal=True)

    def _claim(self, name: str, kind: str) -> None:
        """Note in the cluster's catalog that ``name`` is a ``kind`` (once), or refuse another kind."""
        known = self._claimed.get(name)
        if known is not None and known != kind:  # (it may have been destroyed since: ask the catalog)
            del self._claimed[name]
            known = None
        if known is None:
            catalog = self._catalog()
            known = catalog.get(name)  # a read first: it answers on a side a split left too small
            if known is None:
                try:
                    known = catalog.setdefault(name, kind)
                except SplitBrainProtection:  # (its writes are refused there anyway; its reads answer)
                    return
            if known == kind:
                self._claimed[name] = kind
        if known != kind:
            raise TypeError(f"{name!r} is a distributed {known} on this cluster, not a {kind}: open it "
                            f"with get_{known}({name!r}), or pick another name")

    def status(self, timeout: float = 1.0) -> dict:
        """What each member is doing, asked of all at once (``python -m grid status``):
        ``{"master", "members_version", "is_safe", "members": {uuid: status or "error: ..."}}``, a
        member's status as ``Peer.status`` gives it; one that did not answer within ``timeout``
        seconds says so."""
        members = self.members()
        end = time.monotonic() + timeout
        answers = self.ask_members("status", None, timeout, members)
        try:
            safe = self.is_safe(timeout=max(0.1, end - time.monotonic()))
        except GridError:
            safe = False
        version = next((a["members_version"] for a in answers.values() if isinstance(a, dict)), None)
        return {"master": members[0].uuid if members else None, "members_version": version, "is_safe": safe,
                "members": answers}

    def logs(self, members=None, *, after: dict | None = None, level: int = 0, lines: int | None = None,
             timeout: float = 2.0) -> dict:
        """Each member's recent log lines (``python -m grid logs``): ``{uuid: [(seq, time, level,
        logger, text)] or "error: ..."}``; ``after``: ``{uuid: seq}`` of lines already seen."""
        after = after or {}
        members = self.members() if members is None else members
        return {uuid: answer for member in members
                for uuid, answer in self.ask_members("logs", {"after": after.get(member.uuid, 0), "level": level,
                                                              "lines": lines}, timeout, [member]).items()}

    def stop_members(self, members, timeout: float = 10.0) -> dict:
        """Ask ``members`` to leave cleanly (``python -m grid stop``); ``{uuid: True or "error: ..."}``
        once each is gone from the member list (or ``timeout`` passed)."""
        members = list(members)
        who = f"{socket.gethostname()} pid {os.getpid()}"
        answers = self.ask_members("stop", {"by": who}, timeout, members)
        end = time.monotonic() + timeout
        wake = threading.Event()  # (never set: the pause between looks)
        staying = [m for m in members if answers[m.uuid] is True]
        gone = set()
        while staying and time.monotonic() < end:
            # Gone: out of the member list, or (the last ones: nobody is left to say so) not answering.
            listed = {m.uuid for m in self.members()}
            probes = self.ask_members("status", None, 0.5, [m for m in staying if m.uuid in listed])
            gone |= {m.uuid for m in staying if m.uuid not in listed or not isinstance(probes.get(m.uuid), dict)}
            staying = [m for m in staying if m.uuid not in gone]
            if staying:
                wake.wait(0.05)
        return {m.uuid: True if m.uuid in gone else answers[m.uuid] if answers[m.uuid] is not True
                else f"error: still a member after {timeout:g} s" for m in members}

    def ask_members(self, message_type: str, body, timeout: float, members=None) -> dict:
        """``{uuid: answer or "error: ..."}``: ``message_type`` asked of each member (default: all)
        at once, over a link of its own, each answer awaited until ``timeout`` seconds from now."""
        self._check_open()
        members = self.members() if members is None else list(members)
        transport = self._peer.transport if self._peer else self._link.transport
        asked, answers = {}, {}
        for member in members:
            if self._peer is not None and member.uuid == self._peer.uuid:
                try:
                    answers[member.uuid] = messaging.call_local(self._peer.router, message_type, body)
                except Exception as exc:  # noqa: BLE001 - said as this member's answer
                    answers[member.uuid] = f"error: {type(exc).__name__}: {exc}"
                continue
            asked[member.uuid] = transport.connect(local_target(member))
        end = time.monotonic() + timeout
        requests = {uuid: Future() for uuid in asked}

        def send(uuid, connected):  # (as each link opens: one frozen member delays none of the others)
            if connected.exception() is not None:
                requests[uuid].set_exception(connected.exception())
                return
            conn = connected.result()
            try:
                answer = messaging.request(conn, message_type, body)
            except GridError as exc:
                requests[uuid].set_exception(exc)
                conn.close(f"{message_type} asked")
                return
            answer.add_done_callback(lambda done: (conn.close(f"{message_type} asked"), _chain(done, requests[uuid])))

        for uuid, connecting in asked.items():
            connecting.add_done_callback(lambda connected, uuid=uuid: send(uuid, connected))
        for uuid, answer in requests.items():
            try:
                answers[uuid] = answer.result(max(0.0, end - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - said as that member's answer
                answers[uuid] = f"error: {type(exc).__name__}: {exc}" if str(exc) else \
                    f"error: no answer within {timeout:g} s"
        return {member.uuid: answers.get(member.uuid, "error: not asked") for member in members}

    def is_safe(self, timeout: float = 5.0) -> bool:
        """True when every partition has its owner and every backup in sync with it, as far as every
        data member says within ``timeout`` seconds (Hazelcast's ``isClusterSafe``): all follow this
        handle's table, each owner holds its partitions, each backup holds the owner's last write,
        and no write or snapshot is on its way. A member that does not answer makes it False."""
        table = self.partitions()
        if not table.replicas:
            return False
        keep = partition_width(table, sum(1 for m in self.members() if m.data))
        if any(len(row) > keep for row in table.replicas):  # old replicas kept while new ones fill
            return False
        states = self._data_backend().states(timeout)
        if any(not isinstance(state, dict) or state["table"] != table.version or state["wanting"]
               or state["syncing"] or state["pending"] for state in states.values()):
            return False
        for partition, row in enumerate(table.replicas):
            owner = states[row[0]]["held"].get(partition)
            # A backup takes a partition on its first write: holding none is holding an empty one.
            if owner is None or any(states[uuid]["held"].get(partition, 0) != owner for uuid in row[1:]):
                return False
        return True

    def _data_backend(self) -> RemoteBackend:
        self._check_open()
        with self._executor_lock:
            if self._data is None:
                if self._peer is not None:
                    peer = self._peer
                    self._data = RemoteBackend(transport=peer.transport, members=peer.membership.members,
                                               table=peer.membership.partitions, local=peer.data,
                                               default_partitions=self.config.partitions)
                else:
                    link = self._link
                    self._data = RemoteBackend(transport=link.transport, members=lambda: link.members,
                                               table=lambda: link.partition_table,
                                               default_partitions=self.config.partitions)
            return self._data

    def add_membership_listener(self, listener) -> None:
        """Call ``listener(event)`` for each member that joins or leaves, in order.

        ``event.kind`` is "joined" or "left", ``event.member`` the member and
        ``event.members`` the list after the change. ``event.reason`` says how: "joined";
        or "left" (a clean leave), "crashed" (the failure detector removed it) or "removed"
        (this member dropped it from its view as it rejoins: it was removed, or is merging).
        """
        self._check_open()
        if self._peer:
            self._peer.membership.add_listener(listener)
        else:
            self._link.listeners.add(listener)

    def remove_membership_listener(self, listener) -> None:
        if self._peer:
            self._peer.membership.remove_listener(listener)
        else:
            self._link.listeners.remove(listener)

    # -- cluster-wide code (see livecode.py) ------------------------------------------------------

    def run_all(self, fn, /, *args, **kwargs) -> dict:
        """Call ``fn(*args, **kwargs)`` on every member; returns ``{member: result}``.

        Raises:
            SomeMembersFailed: it raised on some members (``.errors``; ``.results`` holds the rest).
            CodeNotAllowed: (in ``.errors``) for a member running with ``allow_code = false``.
        """
        return self._run_everywhere(livecode.call_body(fn, args, kwargs), "run_all")

    def eval_all(self, expression: str, module: str = "user") -> dict:
        """Evaluate ``expression`` in module ``module`` on every member; ``{member: value}``.

        Raises:
            SyntaxError: at once, before anything is sent.
            SomeMembersFailed: it raised on some members.
        """
        return self._run_everywhere(livecode.eval_body(expression, module), "eval_all")

    def exec_all(self, source: str, module: str = "user", *, filename: str | None = None,
                 local: bool = True) -> dict:
        """Execute ``source`` in module ``module`` on every member, and log it for later joiners.

        The module is created if absent and registered in ``sys.modules``, so what the
        code defines pickles by reference afterwards: ``exec_all("def worker(x): ...")``
        then ``fmap(user.worker, ...)`` needs no cloudpickle. With ``local`` (the default)
        it runs in this process first, so ``import user`` works here too, and an error
        raises here before anything is sent.

        Returns:
            ``{member: None}`` for every member.

        Raises:
            SyntaxError: at once, before anything is sent.
            SomeMembersFailed: it raised on some members; the patch stays in the log.
        """
        patch = patches.exec_patch(source, module, filename)
        return self._apply_everywhere(patch, local, "exec_all")

    def load_all(self, path, module: str | None = None, *, local: bool = True) -> dict:
        """Ship a ``.py`` file (or a package folder) and run it on every member as ``module``.

        ``module`` defaults to the file's (or folder's) name. It is logged for later joiners
        and, with ``local``, imported in this process too. Loading it again re-runs it in place.
        """
        patch = patches.load_patch(path, module)
        return self._apply_everywhere(patch, local, "load_all")

    def deploy(self, module) -> dict:
        """Ship an importable module (a module object or its name) to every member.

        The source of its whole top-level package travels (modules with compiled extensions
        cannot); members import it by name afterwards, so its functions pickle by reference.
        It is logged for later joiners.
        """
        patch = patches.deploy_patch(module)
        return self._apply_everywhere(patch, False, "deploy")

    def patches(self) -> list:
        """The patch log, oldest first: what a member that joins now replays before taking work."""
        epoch, entries = self._code_request("code.patches", None, retry=True)
        return patches.patches_from(entries)

    def reset_patches(self) -> int:
        """Clear the patch log for members that join from now on; returns how many were cleared.

        It does not undo code that already ran: members keep what it defined. It is not
        retried after a lost master (a second reset could clear a patch sent in between):
        if it raises, look at ``patches()`` and reset again if needed.
        """
        return self._code_request("code.reset", None, retry=False)

    def _run_everywhere(self, body, what: str) -> dict:
        outcomes = self._code_request("code.run_all", body, retry=False)
        return livecode.results_by_member(outcomes, self.members(), what)

    def _apply_everywhere(self, patch: dict, local: bool, what: str) -> dict:
        if local and not self.is_member:
            patches.apply_patch(patch)  # raises here, with nothing sent, if it fails
        outcomes = self._code_request("code.submit", patch, retry=True)
        return livecode.results_by_member(outcomes, self.members(), what)

    def _code_request(self, message_type: str, body, *, retry: bool):
        """Ask the cluster; with ``retry``, again (same patch id: logged once) while no master answers."""
        self._check_open()
        deadline = time.monotonic() + 2 * self.config.failure_timeout + self.config.handshake_timeout
        while True:
            try:
                if self._peer:
                    return self._peer.code.local_request(message_type, body).result()
                return self._link.request(message_type, body).result()
            except (livecode.MasterUnavailable, TransportError, NotConnected) as exc:
                if not retry or time.monotonic() >= deadline:
                    raise
                log.info("%s: %s; trying again", message_type, exc)
                # The master may be changing: wait a little (not a busy loop), then ask again.
                threading.Event().wait(min(0.2, max(0.0, deadline - time.monotonic())))

    def executor(self):
        """This handle's own ``GridExecutor`` (made on first use, shut down by ``close()``)."""
        self._check_open()
        with self._executor_lock:
            if self._executor is None or self._executor.is_shutdown:
                self._executor = GridExecutor(cluster=self)
            return self._executor

    def service(self, name: str):
        """A callable that runs the service ``name`` on a member that offers it.

        ``cluster.service("resize")(image)`` returns the result; ``.submit(...)`` returns a
        Future. Tasks fail over to another member offering it, like any task.

        Raises:
            ServiceNotFound: (when called) no member offers ``name``; the error lists those that exist.
        """
        return ServiceProxy(self.executor(), name)

    def close(self) -> None:
        """Disconnect (or, as a member, leave the cluster cleanly). Idempotent."""
        if self._closed:
            return
        self._closed = True
        forget_at_exit(self)
        with self._executor_lock:
            executor, self._executor = self._executor, None
            data, self._data = self._data, None
            events, self._events = self._events, None
            session, self._session = self._session, None
            subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            subscription.cancel(timeout=0)  # (they end once the backend closes, below)
        if session is not None:
            session.close()  # (first: what this handle holds is released while it can still say so)
        if executor is not None:
            executor.shutdown(wait=True)
        if events is not None:
            events.close()
        if data is not None:
            data.close()
        for subscription in subscriptions:
            subscription.cancel()
        if self._peer:
            if self._owns_peer:
                self._peer.close()
        else:
            self._link.close()

    def _check_open(self) -> None:
        if self._closed:
            raise NotConnected("this Cluster handle is closed; call grid.connect() for a new one")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "member" if self.is_member else "client"
        state = "closed" if self._closed else f"{len(self.members())} members"
        return f"<Cluster {self.config.id!r} {role}, {state}>"


class _HandleEvents:
    """A handle's view of an EventHub: the listeners it added go when it closes (a member's hub
    outlives the handles on it)."""

    def __init__(self, hub: EventHub, *, owned: bool):
        self._hub, self._owned = hub, owned
        self._ids: set[str] = set()
        self._gaps: list = []

    def add(self, name, fn, key, predicate, include_value) -> str:
        listener_id = self._hub.add(name, fn, key, predicate, include_value)
        self._ids.add(listener_id)
        return listener_id

    def remove(self, listener_id: str) -> bool:
        self._ids.discard(listener_id)
        return self._hub.remove(listener_id)

    def on_gap(self, callback) -> None:
        self._gaps.append(callback)
        self._hub.on_gap(callback)

    def close(self) -> None:
        if self._owned:
            self._hub.close()
            return
        for listener_id in list(self._ids):
            self._hub.remove(listener_id)
        self._hub.forget_gaps(self._gaps)


class _ClusterRunner:
    """A map's processors and queries, run as tasks on the members that own its partitions
    (``processing`` says what they do there). A task whose member died goes again, to the
    partition's owner by the newer table; a processor's call ids make that a replay."""

    _PATIENCE = 30.0  # seconds to keep trying while owners die and the table moves

    def __init__(self, cluster: Cluster):
        self._cluster = cluster

    def on_key(self, dmap: DMap, key, fn, args: tuple, base: str):
        deadline = time.monotonic() + self._PATIENCE
        while True:
            try:
                future = self._cluster.executor().submit_to_key_owner(key, _key_task, dmap.name, key, fn, args, base)
            except GridError as exc:  # no owner yet, or the table names a member the list does not have yet
                self._pause(deadline, exc)
                continue
            try:
                return future.result()
            except WorkerCrashed as exc:  # (what fn raised is raised as it is)
                self._pause(deadline, exc)

    def on_partitions(self, dmap: DMap, job: tuple) -> dict:
        deadline = time.monotonic() + self._PATIENCE
        results: dict = {}
        pending = set(range(dmap._backend.partitions))
        while pending:
            table = self._cluster.partitions()
            by_owner: dict = {}
            for partition in sorted(pending):
                by_owner.setdefault(table.owner(partition) if table.replicas else None, []).append(partition)
            if None in by_owner:
                self._pause(deadline, GridError(f"no member owns partitions {by_owner[None][:5]}... yet (no data "
                                                f"members in the table of version {table.version})"))
                continue
            executor = self._cluster.executor()
            futures = []
            for owner, partitions in by_owner.items():
                try:
                    futures.append(executor.submit_to_member(owner, _partitions_task, dmap.name, partitions, job))
                except GridError:  # the table names a member the list does not have yet
                    pass
            failure = None
            for future in futures:
                try:
                    answered = future.result()
                except WorkerCrashed as exc:
                    failure = exc
                    continue
                results.update(answered)
                pending -= answered.keys()
            if pending:
                self._pause(deadline, failure or _NotYet(f"partitions {sorted(pending)[:5]} have no owner to ask"))
        return results

    @staticmethod
    def _pause(deadline: float, exc: BaseException) -> None:
        if time.monotonic() >= deadline:
            raise exc
        threading.Event().wait(0.05)


class _NotYet(GridError):
    """The partition table names an owner the member list does not have yet."""


def _key_task(name: str, key, fn, args: tuple, base: str):  # on the key's owner
    return processing.run_on_key(cluster()._map_here(name), key, fn, args, base)


def _partitions_task(name: str, partitions: list, job: tuple) -> dict:  # on the partitions' owner
    dmap = cluster()._map_here(name)
    return {partition: processing.scan(dmap, partition, job) for partition in partitions}


def connect(config=None, *, member: bool = False, timeout: float | None = None) -> Cluster:
    """Connect to a cluster and return a ``Cluster`` handle.

    Args:
        config: a Config, a dict of config keys, a path to a config file, or None for
            the lookup (./grid.toml, ~/.grid/grid.toml, the GRID environment variable).
        member: make this process a full member (it holds data and runs work).
        timeout: seconds to wait for the cluster (default: join_timeout + handshake_timeout).

    Raises:
        NotConnected: no member could be reached.
        ConfigError: the config is invalid.
    """
    return Cluster(load_config(config), member=member, timeout=timeout)


_default: Cluster | None = None
_own_handle: Cluster | None = None  # in a member process: the member handle grid.cluster() returns
_default_lock = threading.Lock()
_open: dict = {}  # handle -> its close function; strong: an unreferenced handle still has threads
_exit_hook_lock = threading.Lock()
_exit_hook_installed = False


def close_at_exit(handle, close) -> None:
    """Call ``close()`` at interpreter exit unless ``forget_at_exit(handle)`` came first.

    Python waits for non-daemon threads at exit; this hook runs before that (as
    concurrent.futures' does), so a handle its owner forgot to close cannot keep the
    process alive. Handles close newest first: an executor before the cluster it uses.
    """
    global _exit_hook_installed
    with _exit_hook_lock:
        _open[handle] = close
        if not _exit_hook_installed:
            threading._register_atexit(_close_all_at_exit)
            _exit_hook_installed = True


def forget_at_exit(handle) -> None:
    with _exit_hook_lock:
        _open.pop(handle, None)


def _close_all_at_exit() -> None:
    with _exit_hook_lock:
        closers = list(_open.items())
    for handle, close in reversed(closers):
        try:
            close()
        except Exception:  # exiting anyway: one broken handle must not keep the others open
            log.exception("closing %r at exit failed", handle)


def cluster() -> Cluster:
    """The default cluster: the one the config lookup names (``GRID``, ./grid.toml,
    ~/.grid/grid.toml), connected on first use; with nothing configured, the private
    embedded cluster of ``default_executor()``, started on first use. In a task on a member
    (a process running a ``Peer``), that member's own handle.

    ``fmap``, ``run_all``, ``exec_all`` and the rest of the module-level functions run
    on this same cluster.
    """
    global _default, _own_handle
    peer = running_peer()
    if peer is not None:  # in a task on a member: that member's own handle (its own keys: no hop)
        with _default_lock:
            if _own_handle is None or _own_handle._peer is not peer:
                _own_handle = Cluster.around(peer)
            return _own_handle
    with _default_lock:
        if _default is not None and not _default._closed:
            return _default
        config = load_config()
        if config.source != "defaults":
            _default = connect(config)
            return _default
    return default_executor().cluster


# -- the executor --------------------------------------------------------------------------------------

def _chain(done: Future, into: Future) -> None:
    """Complete ``into`` as ``done`` completed."""
    if done.exception() is not None:
        into.set_exception(done.exception())
    else:
        into.set_result(done.result())


class GridExecutor(ClusterExecutor):
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
        startup_timeout: seconds to wait for the cluster and the first links to its members.

    Raises:
        NotConnected: no member of the cluster could be reached.
    """

    def __init__(self, max_workers: int | None = None, *, cluster=None, initializer=None, initargs=(),
                 max_retries: int = 3, startup_timeout: float = 30.0):
        if max_workers is not None and max_workers < 1:
            raise ValueError("max_workers must be greater than 0")
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        if initializer is not None:  # one that cannot travel fails here, before a cluster is opened
            serialize.dumps((initializer, tuple(initargs)))
        self._embedded = None
        self._owns_cluster = not isinstance(cluster, Cluster)
        self._handle = cluster if isinstance(cluster, Cluster) else self._open_cluster(cluster, max_workers,
                                                                                          startup_timeout)
        super().__init__(self._handle, initializer=initializer, initargs=initargs, max_retries=max_retries,
                         startup_timeout=startup_timeout,
                         crash_report=self._embedded.exit_report if self._embedded else None,
                         on_teardown=self._close_what_it_opened)
        close_at_exit(self, self._close_at_exit)

    @property
    def cluster(self) -> Cluster:
        """The ``Cluster`` this executor runs on (for an embedded one, a client of its members):
        ``executor.cluster.exec_all(...)`` reaches the same members as ``submit``."""
        return self._handle

    def _open_cluster(self, cluster, max_workers, startup_timeout) -> Cluster:
        if cluster is None:
            config = load_config()
            if config.source == "defaults":
                from .compute.embedded import (
                    EmbeddedCluster,  # only when used: it costs a member's start ~8 ms
                )

                self._embedded = EmbeddedCluster(max_workers or config.effective_workers(),
                                                 startup_timeout=startup_timeout)
                cluster = self._embedded.client_config()
            else:
                cluster = config
        try:
            return connect(cluster, timeout=startup_timeout)
        except BaseException:
            if self._embedded is not None:
                self._embedded.close()
            raise

    def _close_at_exit(self) -> None:
        """At interpreter exit: wait for submitted work, as ProcessPoolExecutor does, unless the
        program ended with Ctrl-C (or Ctrl-C comes while waiting): then stop at once."""
        if isinstance(getattr(sys, "last_value", None), KeyboardInterrupt):
            self.abandon("the program was interrupted (Ctrl-C)")
            return
        try:
            self.shutdown(wait=True)
        except KeyboardInterrupt:  # shutdown abandoned the work and let go of everything
            pass

    def _close_what_it_opened(self) -> None:
        forget_at_exit(self)
        if self._owns_cluster:
            self._handle.close()
        if self._embedded is not None:
            self._embedded.close()


_default_executor: GridExecutor | None = None
_default_executor_lock = threading.Lock()


def default_executor() -> GridExecutor:
    """The executor of the default cluster (see ``cluster()``): the configured cluster, or, with
    nothing configured, a private embedded one (``max_workers``: the core count)."""
    global _default_executor
    with _default_executor_lock:
        if _default_executor is None or _default_executor.is_shutdown:
            config = load_config()
            _default_executor = GridExecutor() if config.source == "defaults" else GridExecutor(cluster=cluster())
        return _default_executor


def fmap(fn, *iterables, chunksize=None, progress=False):
    """``map`` on the default connection's executor: lazy, ordered, bounded in memory (``progress``:
    a progress bar on stderr)."""
    return default_executor().map(fn, *iterables, chunksize=chunksize, progress=progress)


def freduce(map_fn, reduce_fn, iterable, **options):
    """``map_reduce`` on the default connection's executor: ``functools.reduce(reduce_fn, map(map_fn,
    iterable))`` mapped and reduced on the members, one value back (``initial=``, ``chunksize=``)."""
    return default_executor().map_reduce(map_fn, reduce_fn, iterable, **options)


def ufmap(fn, *iterables, chunksize=None, progress=False):
    """Like ``fmap`` but yields results as they complete."""
    return default_executor().map_unordered(fn, *iterables, chunksize=chunksize, progress=progress)


# -- cluster-wide code on the default connection (the cluster ``fmap`` uses) ---------------------------

def run_all(fn, /, *args, **kwargs) -> dict:
    """``Cluster.run_all`` on the default connection (the cluster ``fmap`` uses)."""
    return default_executor().cluster.run_all(fn, *args, **kwargs)


def eval_all(expression: str, module: str = "user") -> dict:
    """``Cluster.eval_all`` on the default connection."""
    return default_executor().cluster.eval_all(expression, module)


def exec_all(source: str, module: str = "user", *, filename: str | None = None, local: bool = True) -> dict:
    """``Cluster.exec_all`` on the default connection."""
    return default_executor().cluster.exec_all(source, module, filename=filename, local=local)


def load_all(path, module: str | None = None, *, local: bool = True) -> dict:
    """``Cluster.load_all`` on the default connection."""
    return default_executor().cluster.load_all(path, module, local=local)


def deploy(module) -> dict:
    """``Cluster.deploy`` on the default connection."""
    return default_executor().cluster.deploy(module)
