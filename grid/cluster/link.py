"""A client's link to a cluster: one authenticated connection to some member, following the member list.

::

    ClusterLink                                      a member
    -----------                                      --------
    connect: every known member, then discovery's
      candidates, until one answers ----------------> "client_hello" -> {version, members}
    "members" pushes (a new list) <------------------ on every change
    every heartbeat_interval: "client_hello" again;
      silent for failure_timeout: drop the link
    link lost: connect again (thread "grid-client")

A frozen member keeps its socket open, and it is the one that would say it was removed:
the repeated hello is what notices. ``grid.Cluster`` (a client) is built on one of these.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid as uuid_module

from ..errors import GridError, NotConnected
from ..net import messaging
from ..net.transport import Transport
from .config import Config
from .discovery import make_discovery
from .members import Departures, Listeners, Member, departures_from_wire
from .multicast import MulticastDiscovery
from .partitions import PartitionTable, empty_table, received_table

log = logging.getLogger("grid.client")


class ClusterLink:
    """A client's link to the cluster: one connection to some member, re-made when it drops.

    ``members`` is the member list as last pushed (oldest first); ``listeners`` get its
    changes; ``request(type, body)`` asks the member the link is on.

    Raises:
        NotConnected: (from ``__init__``) no member answered within ``timeout``.
    """

    def __init__(self, config: Config, *, timeout: float | None):
        self.config = config
        self.members: tuple[Member, ...] = ()
        self.version = 0
        self.partition_table: PartitionTable = empty_table(config.partitions, config.backup_count)
        self.listeners = Listeners()
        self._departures = Departures()  # how recent members left, as the members' lists said
        self._secret = config.resolved_secret()
        self._router = messaging.Router()
        self._router.register("members", self._on_members)
        self._closed = threading.Event()
        self._lost = threading.Event()
        self._lock = threading.Lock()
        self._conn = None
        self._last_answer = time.monotonic()
        self._transport = Transport(
            cluster_id=config.id, secret=self._secret,
            info={"uuid": uuid_module.uuid4().hex, "role": "client"},
            on_frame=self._router.on_frame, on_close=self._on_close,
            handshake_timeout=config.handshake_timeout, tls=config.tls, max_payload=config.max_frame_bytes)
        try:
            self._discovery = make_discovery(config.replace(register_on_join=False), secret=self._secret)
            if isinstance(self._discovery, MulticastDiscovery):
                # Listen for members' announcements; a client asks but is never a candidate.
                self._discovery.set_state("client")
                self._discovery.start((config.bind_host(), 0))
            wait = timeout if timeout is not None else config.join_timeout + config.handshake_timeout
            self._connect(deadline=time.monotonic() + wait)
        except BaseException:
            self._transport.close()
            if hasattr(self, "_discovery"):
                self._discovery.stop(clean=False)
            self.listeners.close()
            raise
        self._thread = threading.Thread(target=self._keep_connected, name="grid-client")
        self._thread.start()

    @property
    def transport(self):
        """The link's transport: more links to members (the data proxies' to owners) are made with it."""
        return self._transport

    @property
    def router(self):
        """The handlers of what members send on this link's transport (a data member's entry events)."""
        return self._router

    def _candidates(self) -> list:
        known = [m.address for m in self.members]
        return known + [address for address in self._discovery.candidates() if address not in known]

    def _connect(self, deadline: float) -> None:
        reasons = {}
        while not self._closed.is_set():
            for address in self._candidates():
                try:
                    conn = self._transport.connect(address).result(self.config.handshake_timeout)
                    reply = messaging.request(conn, "client_hello", None).result(self.config.handshake_timeout)
                except Exception as exc:
                    reasons[address] = str(exc) or type(exc).__name__
                    continue
                with self._lock:
                    self._conn = conn
                    self._last_answer = time.monotonic()
                    self._lost.clear()
                    if not conn.is_open:  # it closed after answering, before it was ours: _on_close
                        self._lost.set()  # passed it over (a member killed just then), so look again
                self._update(reply)
                return
            if time.monotonic() >= deadline:
                tried = "; ".join(f"{h}:{p}: {why}" for (h, p), why in reasons.items()) or "no candidates found"
                raise NotConnected(f"cannot reach any member of cluster {self.config.id!r} ({tried}); "
                                   "start a member (`python -m grid peer`) or check `members` and the secret")
            self._closed.wait(0.1)

    def _on_members(self, conn, body) -> None:
        self._update(body)

    def _update(self, body: dict) -> None:
        """Follow a member list: a "members" push or a "client_hello" reply."""
        version = body["version"]
        members = tuple(Member.from_wire(m) for m in body["members"])
        departed = departures_from_wire(body.get("departed"))  # absent from an older member: clean leaves
        with self._lock:
            same_master = bool(members) and bool(self.members) and members[0].uuid == self.members[0].uuid
            if same_master and version <= self.version:
                return  # older news from the same master (a push can overtake the hello reply)
            self._departures.update(departed)
            self._departures.forget(members)
            old, self.members = self.members, members
            self.version = version
            self._take_table(body.get("partitions"), same_master)
            self.listeners.emit_changes(old, self.members, version, self._departures)

    def _take_table(self, wire, same_master: bool) -> None:
        """(Under the lock) the list's partition table: newer from the same master, any from a new one."""
        table = received_table(wire)
        if table is not None and (table.version > self.partition_table.version or not same_master):
            self.partition_table = table

    def _on_close(self, conn) -> None:
        if conn is self._conn:
            self._lost.set()

    def _check_alive(self) -> None:
        """Ask the member for the member list each heartbeat; drop the link if it stops answering.

        A frozen or hung member keeps its socket open, and it is the one that would tell us
        it was removed: without this a client (and its pending requests) would wait forever.
        """
        with self._lock:
            conn, last_answer = self._conn, self._last_answer
        if conn is None or not conn.is_open:
            return
        silent = time.monotonic() - last_answer
        if silent > self.config.failure_timeout:
            log.warning("member at %s has not answered for %.1f s; linking to another member", conn.remote, silent)
            conn.close(f"the member did not answer for {silent:.1f} s (failure_timeout)")
            return
        try:
            messaging.request(conn, "client_hello", None).add_done_callback(self._answered)
        except GridError:
            pass  # closing: _on_close reconnects

    def _answered(self, done) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        reply = done.result()
        with self._lock:
            self._last_answer = time.monotonic()
        self._update(reply)

    def _keep_connected(self) -> None:
        while not self._closed.is_set():
            if not self._lost.wait(self.config.heartbeat_interval):
                self._check_alive()
                continue
            if self._closed.is_set():
                return
            log.info("lost the link to the cluster; reconnecting")
            try:
                self._connect(deadline=time.monotonic() + self.config.failure_timeout)
            except NotConnected as exc:
                log.warning("%s", exc)
                self._closed.wait(1.0)

    def request(self, message_type: str, body):
        """A request to the member this link is on; the Future fails if the link is down."""
        with self._lock:
            conn = self._conn
        if conn is None or not conn.is_open:
            raise NotConnected("the link to the cluster is down; it is being re-made")
        return messaging.request(conn, message_type, body)

    def close(self) -> None:
        self._closed.set()
        self._lost.set()
        self._thread.join()
        self._transport.close()
        self._discovery.stop(clean=False)
        self.listeners.close()
