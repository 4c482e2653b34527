"""Entry listeners: the owners of a map's partitions tell the clients that listen what changed.

::

    client: map.add_entry_listener(fn, key=, predicate=, include_value=)
        EventHub.add --"data.listen" (id, map, key bytes, include value)--> every data member
        (answered before add returns; a member that joins later, or a link made again, is told too)
    owner:  a write acknowledged (every backup applied it) --> its effects as events -->
        "data.event" [(id, kind, key bytes, value bytes)] --> each listening link, in the order written
    client: the link's IO thread queues them --> thread "grid-events" calls fn(EntryEvent), in order

Kinds: "added", "updated", "removed", "expired", "evicted", and "cleared" (``map.clear()``: key
None). Values come with "added" and "updated" (``include_value``); a predicate ``(key, value)``
is applied here, on the client (the members never unpickle a value for it). Events of one key
come in the order of its writes; a failover may lose the events of writes in flight (a near
cache empties itself then). Listeners run on one thread: a slow one delays the others.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import pickle
import queue
import threading
import uuid as uuid_module
from concurrent.futures import Future
from typing import Any

from ..cluster.members import local_target
from ..errors import GridError
from ..net import messaging
from .store import MAP

log = logging.getLogger("grid.data")

EVENT_KINDS = {"add": "added", "set": "updated", "del": "removed", "expire": "expired", "evict": "evicted",
               "clear": "cleared"}
_LOOK = 0.2  # seconds between the hub's looks at the member list (joiners, links lost)
_ASK_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class EntryEvent:
    """One change of a map entry: ``kind`` (added, updated, removed, expired, evicted, cleared),
    ``key`` (None for cleared), ``value`` (for added and updated, with include_value), ``map_name``."""

    kind: str
    key: Any
    value: Any
    map_name: str


def events_of(effects, listened) -> list:
    """``[(map name, kind, key bytes, value bytes)]`` of a write's ``effects`` in maps ``listened``."""
    found = []
    for kind, name, effect, args in effects:
        if kind != MAP or name not in listened:
            continue
        event = EVENT_KINDS.get(effect)
        if event is None:  # ("meta": an entry's times)
            continue
        if effect == "clear":
            found.append((name, event, None, None))
        else:
            found.append((name, event, args[0], args[1] if effect in ("add", "set") else None))
    return found


class MemberListeners:
    """A member's side: which links (or local sinks) listen to which maps; the events of each
    acknowledged write go to them. Called under the data service's lock."""

    def __init__(self):
        self._by_sink: dict = {}  # conn or callable -> {listener id: (map name, key bytes or None, include value)}
        self._maps: dict[str, int] = {}  # map name -> registrations

    def listen(self, sink, listener_id: str, name: str, key, include_value: bool) -> bool:
        registrations = self._by_sink.setdefault(sink, {})
        if listener_id not in registrations:
            self._maps[name] = self._maps.get(name, 0) + 1
        registrations[listener_id] = (name, key, include_value)
        return True

    def unlisten(self, sink, listener_id: str) -> bool:
        registration = self._by_sink.get(sink, {}).pop(listener_id, None)
        if registration is None:
            return False
        self._forget_map(registration[0])
        return True

    def _forget_map(self, name: str) -> None:
        left = self._maps.get(name, 0) - 1
        if left > 0:
            self._maps[name] = left
        else:
            self._maps.pop(name, None)

    def written(self, effects) -> None:
        """A write was acknowledged: its events go to every listener of its maps."""
        if not self._maps:
            return
        events = events_of(effects, self._maps)
        if not events:
            return
        for sink, registrations in list(self._by_sink.items()):
            batch = [(listener_id, kind, key, value if include else None)
                     for listener_id, (listened, wanted_key, include) in registrations.items()
                     for name, kind, key, value in events
                     if name == listened and (wanted_key is None or key is None or key == wanted_key)]
            if not batch:
                continue
            if callable(sink):
                sink(batch)
                continue
            if not sink.is_open:
                self._drop(sink)
                continue
            try:
                messaging.send(sink, "data.event", batch)
            except GridError:
                self._drop(sink)

    def _drop(self, sink) -> None:
        for name, _, _ in self._by_sink.pop(sink, {}).values():
            self._forget_map(name)


@dataclasses.dataclass
class _Listener:
    name: str
    fn: Any
    key: bytes | None
    predicate: Any
    include_value: bool


class EventHub:
    """A handle's side: its listeners, their registrations on the data members, and the thread
    that calls them. ``local``: this member's data service (a member's own handle)."""

    def __init__(self, *, transport, router, members, local=None):
        self._transport = transport
        self._members = members
        self._local = local
        self._listeners: dict[str, _Listener] = {}
        self._links: dict[str, tuple] = {}  # member uuid -> (Future of its conn, set of listener ids registered)
        self._gap_callbacks: list = []  # called when events may have been lost (a link lost, a member gone)
        self._lock = threading.RLock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._prefix = uuid_module.uuid4().hex[:8]
        self._closed = threading.Event()
        if router is not None:
            router.register("data.event", self._on_event)
        self._thread = threading.Thread(target=self._run, name="grid-events", daemon=True)
        self._thread.start()

    # -- the user's side ---------------------------------------------------------------------------------

    def add(self, name: str, fn, key: bytes | None, predicate, include_value: bool) -> str:
        """Register a listener on every data member (answered before this returns); its id."""
        listener_id = f"{self._prefix}:{next(self._ids)}"
        with self._lock:
            self._listeners[listener_id] = _Listener(name, fn, key, predicate, include_value)
        self._ensure(wait=True)
        return listener_id

    def remove(self, listener_id: str) -> bool:
        with self._lock:
            listener = self._listeners.pop(listener_id, None)
            links = list(self._links.items())
        if listener is None:
            return False
        for uuid, (future, registered) in links:
            if listener_id in registered:
                registered.discard(listener_id)
                if future is None:
                    self._local_call(lambda service: service.listeners.unlisten(self._sink, listener_id))
                elif future.done() and future.exception() is None and future.result().is_open:
                    messaging.request(future.result(), "data.unlisten", listener_id)
        return True

    def on_gap(self, callback) -> None:
        """``callback()`` whenever events may have been missed (a near cache empties then)."""
        with self._lock:
            self._gap_callbacks.append(callback)

    def forget_gaps(self, callbacks) -> None:
        with self._lock:
            self._gap_callbacks = [callback for callback in self._gap_callbacks if callback not in callbacks]

    def close(self) -> None:
        self._closed.set()
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        with self._lock:
            links, self._links = self._links, {}
        for future, registered in links.values():
            if future is None:
                ids = set(registered)
                self._local_call(lambda service: [service.listeners.unlisten(self._sink, i) for i in ids])
            elif future.done() and future.exception() is None:
                future.result().close("the handle closed")

    # -- registrations -----------------------------------------------------------------------------------

    def _sink(self, batch) -> None:  # the local member's events (under its data lock: only queued)
        self._queue.put(batch)

    def _local_call(self, fn):
        service = self._local
        if service is not None:
            with service._lock:
                return fn(service)
        return None

    def _ensure(self, *, wait: bool = False) -> None:
        """Every data member has a link with every listener registered; lost links are made again."""
        if not self._listeners and not self._links:
            return
        answers: list[Future] = []
        gap = False
        with self._lock:
            listeners = dict(self._listeners)
            members = {m.uuid: m for m in self._members() if m.data}
            for uuid in list(self._links):
                future, _ = self._links[uuid]
                lost = uuid not in members or (future is not None and future.done() and (
                    future.exception() is not None or not future.result().is_open))
                if lost:
                    del self._links[uuid]
                    gap = True
                    if future is not None and future.done() and future.exception() is None:
                        future.result().close("no longer a data member")
            if not listeners:
                return
            for uuid, member in members.items():
                if uuid not in self._links:
                    if self._local is not None and uuid == self._local.me.uuid:
                        self._links[uuid] = (None, set())
                    else:
                        self._links[uuid] = (self._transport.connect(local_target(member)), set())
                future, registered = self._links[uuid]
                missing = [listener_id for listener_id in listeners if listener_id not in registered]
                if not missing:
                    continue
                if future is None:
                    for listener_id in missing:
                        listener = listeners[listener_id]
                        self._local_call(lambda service, i=listener_id, li=listener: service.listeners.listen(
                            self._sink, i, li.name, li.key, li.include_value or li.predicate is not None))
                        registered.add(listener_id)
                    continue
                if not future.done() and not wait:
                    continue
                try:
                    conn = future.result(_ASK_TIMEOUT)
                except Exception:  # noqa: BLE001 - the next look tries again
                    continue
                for listener_id in missing:
                    listener = listeners[listener_id]
                    answers.append(messaging.request(conn, "data.listen", (
                        listener_id, listener.name, listener.key, listener.include_value or listener.predicate is not None)))
                    registered.add(listener_id)
        if wait:
            for answer in answers:
                answer.exception(_ASK_TIMEOUT)
        if gap:
            self._gap()

    def _gap(self) -> None:
        for callback in list(self._gap_callbacks):
            try:
                callback()
            except Exception:  # noqa: BLE001
                log.exception("a near cache failed to empty itself")

    # -- events ------------------------------------------------------------------------------------------

    def _on_event(self, conn, body) -> None:  # IO thread: queued only
        if type(body) is not list:
            raise GridError(f"a 'data.event' body is a list of events, not {messaging.shorten(body)}")
        self._queue.put(body)

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                batch = self._queue.get(timeout=_LOOK)
            except queue.Empty:
                batch = ()
            if batch is None:
                return
            for item in batch:
                self._deliver(item)
            try:
                self._ensure()
            except Exception:  # noqa: BLE001 - the next look tries again
                log.debug("listener registration failed", exc_info=True)

    def _deliver(self, item) -> None:
        try:
            listener_id, kind, key_data, value_data = item
        except (TypeError, ValueError):
            return
        with self._lock:
            listener = self._listeners.get(listener_id)
        if listener is None:
            return
        try:
            key = None if key_data is None else pickle.loads(key_data)
            value = None if value_data is None else pickle.loads(value_data)
            if listener.predicate is not None and key is not None and not listener.predicate(key, value):
                return
            listener.fn(EntryEvent(kind, key, value if listener.include_value else None, listener.name))
        except Exception:  # noqa: BLE001 - a listener's failure is its own
            log.exception("entry listener %s failed on a %s event", listener_id, kind)


class _LocalMember:
    uuid = "local"
    data = True


class _LocalService:
    me = _LocalMember

    def __init__(self, backend):
        self.listeners = backend.listeners
        self._lock = backend._lock


def local_hub(backend) -> EventHub:
    """The hub of the maps on a ``store.LocalBackend`` (made once, on the first listener)."""
    with backend._lock:
        if backend.listeners is None:
            backend.listeners = MemberListeners()
    if backend.events is None:
        backend.events = EventHub(transport=None, router=None, members=lambda: [_LocalMember],
                                  local=_LocalService(backend))
    return backend.events


__all__ = ["EVENT_KINDS", "EntryEvent", "EventHub", "MemberListeners", "events_of", "local_hub"]
