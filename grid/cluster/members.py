"""Who a member is, and how membership changes reach listeners.

``Member`` is one member as every other member knows it (``to_wire``/``from_wire``
for the member lists on the wire); ``MembershipEvent`` is one join or leave, with how
a member left; ``Departures`` is the master's record of how recent members left, which
travels with every member list ("departed": {uuid: reason}; a list without it, from an
older member, reads as clean leaves); ``Listeners`` delivers events in order on one
owned thread ("grid-events"), for a member's ``Membership`` and a client's ``Cluster``
alike. The functions at the end say how this process names itself and how it reaches
another member.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import threading

from ..net.address import format_address

log = logging.getLogger("grid.membership")  # one logger for all of membership, whichever file logs


@dataclasses.dataclass(frozen=True, order=True)
class Member:
    """One member of the cluster, as every other member knows it."""

    uuid: str
    address: tuple[str, int]
    pid: int = 0
    hostname: str = ""
    workers: int = 1  # task threads: how much work the executor keeps in flight here
    unix: str = ""  # a Unix socket path for processes on the same host ("" if none)
    data: bool = True  # holds partitions of the data (False: a lite member, which only computes)

    def __str__(self) -> str:
        return format_address(self.address)

    def to_wire(self) -> dict:
        return {"uuid": self.uuid, "address": list(self.address), "pid": self.pid, "hostname": self.hostname,
                "workers": self.workers, "unix": self.unix, "data": self.data}

    @classmethod
    def from_wire(cls, data: dict) -> Member:
        host, port = data["address"]
        return cls(uuid=data["uuid"], address=(host, int(port)), pid=data.get("pid", 0),
                   hostname=data.get("hostname", ""), workers=data.get("workers", 1), unix=data.get("unix", ""),
                   data=bool(data.get("data", True)))

    @property
    def host(self) -> str:
        """The host it runs on, as the partition table keeps replicas apart: its hostname, else its IP."""
        return self.hostname or self.address[0]


# event.reason: how a member came or went.
JOINED = "joined"
LEFT = "left"  # it said goodbye (a clean leave)
CRASHED = "crashed"  # it went without one: heartbeats stopped, its link was refused, or a new process took its address
REMOVED = "removed"  # dropped from this member's view otherwise (it was removed, or merges into another cluster)
DEPARTURE_REASONS = (LEFT, CRASHED, REMOVED)
_RECENT_DEPARTURES = 32  # how many departures a member list carries the reasons of


@dataclasses.dataclass(frozen=True)
class MembershipEvent:
    """One change of the member list.

    ``kind`` is "joined" or "left"; ``members`` is the list right after the change.
    ``reason`` says how: "joined" for a join; for a departure "left" (a clean leave: it
    said goodbye), "crashed" (it went without one: the failure detector removed it) or
    "removed" (this member dropped it from its view for another reason: this member was
    removed from the cluster, or its cluster merges into another, and it joins again).
    Without one it reads as its ``kind``.
    """

    kind: str
    member: Member
    members: tuple[Member, ...]
    version: int
    reason: str = ""

    def __post_init__(self) -> None:
        if not self.reason:
            object.__setattr__(self, "reason", JOINED if self.kind == "joined" else LEFT)


def departures_from_wire(value) -> dict[str, str]:
    """The ``departed`` map of a member list off the wire; anything malformed is left out.

    A reason this version does not know (a newer member's) reads as "removed".
    """
    if not isinstance(value, dict):
        return {}
    return {uuid: reason if reason in DEPARTURE_REASONS else REMOVED
            for uuid, reason in value.items() if isinstance(uuid, str) and isinstance(reason, str)}


class Departures:
    """How the most recent members left (uuid -> reason), for the member lists that announce it."""

    def __init__(self, limit: int = _RECENT_DEPARTURES):
        self._limit = limit
        self._reasons: dict[str, str] = {}

    def record(self, uuid: str, reason: str) -> None:
        self._reasons.pop(uuid, None)
        self._reasons[uuid] = reason
        while len(self._reasons) > self._limit:
            del self._reasons[next(iter(self._reasons))]

    def update(self, reasons: dict[str, str]) -> None:
        for uuid, reason in reasons.items():
            self.record(uuid, reason)

    def forget(self, members) -> None:
        """Drop the reasons of ``members`` (they are in the list again)."""
        for member in members:
            self._reasons.pop(member.uuid, None)

    def get(self, uuid: str, default: str) -> str:
        return self._reasons.get(uuid, default)

    def to_wire(self) -> dict[str, str]:
        return dict(self._reasons)


class Listeners:
    """Membership listeners, called in order on one owned thread ("grid-events")."""

    def __init__(self):
        self._listeners: list = []
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _put(self, event) -> None:
        with self._lock:
            if self._closed:
                return
            listeners = tuple(self._listeners)  # a listener added later does not see older events
            if not listeners:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="grid-events")
                self._thread.start()
            self._queue.put((event, listeners))

    def add(self, listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove(self, listener) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    def emit_changes(self, old, new, version: int, reasons=None, default: str = LEFT) -> None:
        """Queue "left" events for members gone from ``old`` and "joined" for new ones.

        Args:
            reasons: how members left (``reasons.get(uuid, default)``: a dict or ``Departures``).
            default: the reason of a departure ``reasons`` does not name.
        """
        new = tuple(new)
        new_uuids = {m.uuid for m in new}
        old_uuids = {m.uuid for m in old}
        for member in old:
            if member.uuid not in new_uuids:
                reason = reasons.get(member.uuid, default) if reasons is not None else default
                self._put(MembershipEvent("left", member, new, version, reason))
        for member in new:
            if member.uuid not in old_uuids:
                self._put(MembershipEvent("joined", member, new, version, JOINED))

    def close(self) -> None:
        """Deliver what is queued, then stop and join the thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            if thread is not threading.current_thread():
                thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            event, listeners = item
            for listener in listeners:
                try:
                    listener(event)
                except Exception:
                    log.exception("membership listener %r failed", listener)


def advertised_address(host: str, port: int) -> tuple[str, int]:
    """The address other members reach us at (``0.0.0.0`` resolved to this host's IP)."""
    if host in ("0.0.0.0", "::", ""):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return (host, port)


def local_member(address: tuple[str, int], uuid: str, workers: int = 1, unix: str = "", data: bool = True) -> Member:
    return Member(uuid=uuid, address=address, pid=os.getpid(), hostname=socket.gethostname(), workers=workers,
                  unix=unix, data=data)


def local_target(member: Member):
    """How to reach ``member`` from this process: its Unix socket when it runs on this host."""
    if member.unix and member.hostname == socket.gethostname() and os.path.exists(member.unix):
        return member.unix
    return member.address


__all__ = [
    "CRASHED", "DEPARTURE_REASONS", "JOINED", "LEFT", "REMOVED", "Departures", "Listeners", "Member", "MembershipEvent",
    "advertised_address", "departures_from_wire", "local_member", "local_target",
]
