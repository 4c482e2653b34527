"""Who is in the cluster: join, the master, heartbeats, failure detection, events.

The oldest member is the master: the member list is kept in join order and
its first entry is the master. The master admits joiners and publishes a
versioned list to every member (and to connected clients). Every member
heartbeats every other member over its own outbound link; a member silent for
``failure_timeout``, or whose link drops and cannot be re-established, is
removed. When the master dies, the next oldest takes over.

All state lives on one thread ("grid-membership"); the IO thread only posts
work to its inbox (and answers ``who`` from a published snapshot).

This file is the state machine: its states and their one transition table, the
member list, links and failure detection, merging, leaving, and the message
handlers. Finding a cluster to join, or forming one, is its base class,
``Joiner``, in ``joining.py``; ``Member``, ``MembershipEvent`` and the event
thread (``Listeners``) are in ``members.py``.
"""

from __future__ import annotations

import dataclasses
import enum
import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from ..errors import GridError
from ..net import messaging
from ..net.address import format_address
from ..net.security import HandshakeFailed
from .joining import Joiner
from .members import CRASHED, LEFT, REMOVED, Departures, Listeners, Member, departures_from_wire
from .partitions import PartitionTable, empty_table, keep_holders, plan, received_table, trimmed

log = logging.getLogger("grid.membership")
_PROBE_EVERY = 5.0  # seconds between heartbeats to a member that ask it for an echo (a round trip)

_JOIN_RETRY = 0.1  # seconds between join attempts
_MERGE_INTERVAL = 1.0  # how often a master looks for other clusters of the same id to merge with
_REFRESH_INTERVAL = 5.0  # how often a member puts back its discovery entry if it went missing


class State(enum.Enum):
    STARTING = "starting"
    JOINING = "joining"
    MEMBER = "member"
    LEAVING = "leaving"
    STOPPED = "stopped"


_TRANSITIONS = {
    State.STARTING: {State.JOINING, State.STOPPED},
    State.JOINING: {State.MEMBER, State.STOPPED},
    State.MEMBER: {State.JOINING, State.LEAVING, State.STOPPED},
    State.LEAVING: {State.STOPPED},
    State.STOPPED: set(),
}


class Membership(Joiner):
    """The member list of this process's member, kept in agreement with the cluster.

    Args:
        me: this member.
        transport: the process's Transport (links are made with it).
        router: where membership registers its message handlers.
        discovery: a started Discovery (candidates for joining).
        heartbeat_interval, failure_timeout: seconds.
        required: an address that must be in the cluster (no cluster forms without it).
        clock: an object with ``monotonic()``.
        partitions, backup_count: the partition table's shape (the master plans it; see partitions.py).
    """

    def __init__(self, *, me: Member, transport, router, discovery, heartbeat_interval: float = 1.0,
                 failure_timeout: float = 10.0, required: tuple[str, int] | None = None, clock=time,
                 partitions: int = 271, backup_count: int = 1):
        self.me = me
        self._shape = (partitions, backup_count)
        # How often this member left the member list to join again: what it held of the data before
        # is stale then (the cluster went on without it), and the data layer drops it.
        self.epoch = 0
        self.merging = False  # the last rejoin merges this member's side into another cluster
        self._told_shape: tuple | None = None  # a table shape unlike the config's, once warned of
        self.partition_table: PartitionTable = empty_table(partitions, backup_count)
        self.transport = transport
        self.discovery = discovery
        self.heartbeat_interval = heartbeat_interval
        self.failure_timeout = failure_timeout
        self.required = required
        self.clock = clock
        self.state = State.STARTING
        self._members: tuple[Member, ...] = ()
        self.version = 0
        self._links: dict[str, object] = {}  # uuid -> outbound Connection
        self._connecting: dict[str, Future] = {}  # uuid -> pending connect
        self._probes: dict[tuple, Future] = {}  # address -> connection used while joining
        self._last_heard: dict[str, float] = {}
        self._probed_at: dict[str, float] = {}  # uuid -> when a heartbeat to it last asked for an echo
        self.heartbeat_rtts: dict[str, collections.deque] = {}  # uuid -> recent round trips (seconds; metrics)
        self._suspected: set[str] = set()
        self._clients: set = set()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._joined = threading.Event()
        self._join_error: BaseException | None = None
        self.listeners = Listeners()
        self._departures = Departures()  # how recent members left: sent with every member list
        self._stop = False
        self._last_tick = clock.monotonic()
        self._next_merge_check = 0.0
        self._next_refresh = 0.0
        self._refusals: dict = {}  # address -> why it refused our handshake (while joining)
        self._merge_target: tuple | None = None  # the master of the larger cluster we are merging into
        self._unreachable_since: dict[tuple, float] = {}  # discovered non-member -> first failed probe
        self._discovery_problem: str | None = None  # the last discovery error logged (logged once)
        router.register("who", self._on_who)
        router.register("join", self._on_join)
        router.register("members", self._on_members)
        router.register("hb", self._on_heartbeat)
        router.register("hb_echo", self._on_heartbeat_echo)
        router.register("suspect", self._on_suspect)
        router.register("leave", self._on_leave)
        router.register("removed", self._on_removed)
        router.register("client_hello", self._on_client_hello)
        router.register("merge", self._on_merge)
        router.register("merge_into", self._on_merge_into)
        self._thread = threading.Thread(target=self._run, name="grid-membership")

    # -- public, any thread -------------------------------------------------------------------

    def members(self) -> tuple[Member, ...]:
        return self._members

    def master(self) -> Member | None:
        members = self._members
        return members[0] if members else None

    def partitions(self) -> PartitionTable:
        """The partition table as the master last sent it (planned here, on the master)."""
        return self.partition_table

    @property
    def is_master(self) -> bool:
        master = self.master()
        return master is not None and master.uuid == self.me.uuid

    def add_listener(self, listener) -> None:
        """Call ``listener(MembershipEvent)`` for every join and leave, in order, on one thread."""
        self.listeners.add(listener)

    def remove_listener(self, listener) -> None:
        self.listeners.remove(listener)

    def start(self) -> None:
        self._thread.start()
        self._post(self._begin_join)

    def wait_joined(self, timeout: float | None = None) -> None:
        """Block until this member is in a cluster.

        Raises:
            JoinError: no cluster could be formed (e.g. the required member is absent).
            TimeoutError: not joined within ``timeout``.
        """
        if not self._joined.wait(timeout):
            if self._join_error is not None:
                raise self._join_error
            raise TimeoutError(f"not joined within {timeout} s")
        if self._join_error is not None:
            raise self._join_error

    def leave(self, timeout: float = 2.0) -> None:
        """Leave the cluster cleanly (the others remove this member at once)."""
        done: Future = Future()
        self._post(lambda: self._leave(done))
        try:
            done.result(timeout + 0.5)
        except (FutureTimeout, GridError) as exc:
            log.info("leaving: the master did not confirm (%s); the others will notice", exc)

    def close(self) -> None:
        """Stop the membership thread and the event thread and join them."""
        self._stop = True
        self._post(lambda: None)
        if self._thread.is_alive():
            self._thread.join()
        self.listeners.close()
        for conn in list(self._links.values()):
            conn.close("membership closed")

    # -- the membership thread ---------------------------------------------------------------

    def _post(self, fn) -> None:
        self._inbox.put(fn)

    def _run(self) -> None:
        self._next_tick = self.clock.monotonic()
        while not self._stop:
            timeout = max(0.0, self._next_tick - self.clock.monotonic())
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is not None:
                try:
                    item()
                except Exception:
                    log.exception("membership error")
            if self._stop:
                break
            now = self.clock.monotonic()
            if now >= self._next_tick:
                try:
                    interval = self._tick(now)
                except Exception:
                    log.exception("membership tick failed")
                    interval = self.heartbeat_interval
                self._next_tick = self.clock.monotonic() + interval
        self._set_state(State.STOPPED)

    def _set_state(self, new: State) -> None:
        if new is self.state:
            return
        if new not in _TRANSITIONS[self.state]:
            raise GridError(f"membership cannot go from {self.state.value} to {new.value}")
        log.debug("membership %s -> %s", self.state.value, new.value)
        self.state = new
        if new in (State.JOINING, State.MEMBER):
            try:
                self.discovery.set_state("member" if new is State.MEMBER else "joining")
            except Exception:
                log.exception("discovery.set_state failed")

    def _tick(self, now: float) -> float:
        if self.state is State.JOINING:
            self._join_attempt()
            return _JOIN_RETRY
        if self.state is State.MEMBER:
            self._heartbeat(now)
            if self.is_master and now >= self._next_merge_check:
                self._next_merge_check = now + _MERGE_INTERVAL
                self._look_for_other_clusters()
            if now >= self._next_refresh:
                self._next_refresh = now + _REFRESH_INTERVAL
                self._discovery_call(self.discovery.refresh)
            return min(self.heartbeat_interval, self.failure_timeout / 4, _MERGE_INTERVAL)
        return self.heartbeat_interval

    # -- joining: into JOINING and out to MEMBER (the search in between is Joiner's, joining.py) --

    def _begin_join(self) -> None:
        self._set_state(State.JOINING)
        self._join_started = self._next_tick = self.clock.monotonic()
        self._last_reasons: dict = {}
        self._refusals = {}

    def _enter_cluster(self, version: int, members, table=None) -> None:
        self._set_state(State.MEMBER)
        self._suspected.clear()
        self._take_table(table)  # (the master's join reply carries it)
        self._apply(version, members, force=True)
        self._join_error = None
        self._merge_target = None
        self._joined.set()
        master = self.master()
        log.info("joined the cluster: %d members, master %s", len(members), master)

    # -- the member list ---------------------------------------------------------------------

    def _apply(self, version: int, members, *, force: bool = False, departed=None) -> None:
        """Take the list ``members`` (``departed``: how members left, as the master said)."""
        if not force and version <= self.version:
            return
        old = self._members
        members = tuple(members)
        if self.state is State.MEMBER and all(m.uuid != self.me.uuid for m in members):
            log.warning("the master removed this member from the cluster; rejoining")
            self._rejoin()
            return
        if departed:
            self._departures.update(departed)
        self._departures.forget(members)
        self.version = version
        self._members = members
        if self.state is State.MEMBER and self.is_master:
            self._replan()
        now = self.clock.monotonic()
        uuids = {m.uuid for m in members}
        for member in members:
            if member.uuid != self.me.uuid:
                self._last_heard.setdefault(member.uuid, now)
                self._ensure_link(member)
        for uuid in list(self._last_heard):
            if uuid not in uuids:
                del self._last_heard[uuid]
        self._suspected &= uuids
        for uuid in list(self._links):
            if uuid not in uuids:
                self._links.pop(uuid).close("no longer a member")
        self.listeners.emit_changes(old, members, version, self._departures)
        for conn in list(self._clients):
            self._send(conn, "members", self._members_body())

    def _members_body(self) -> dict:
        """The member list as it travels: version, members, how recent members left, and the
        partition table."""
        return {"version": self.version, "members": [m.to_wire() for m in self._members],
                "departed": self._departures.to_wire(), "partitions": self.partition_table.to_wire()}

    def _replan(self) -> None:
        """Master: the partition table for this member list (the data members, kept on distinct hosts).

        Planned twice (the second time with the first's new replicas holding the data, so owners
        even out), and every replica it drops that is still a member stays at the end of its row
        until the new replicas have the data: the master's data service then trims it
        (``trim_partitions``). A join never leaves a partition with only a joiner that is still
        receiving it.
        """
        data = [(m.uuid, m.host) for m in self._members if m.data]
        first = plan(self.partition_table, data)
        settled = keep_holders(plan(first, data), self.partition_table, {uuid for uuid, _ in data})
        if settled is not self.partition_table and settled.replicas != self.partition_table.replicas:
            self.partition_table = dataclasses.replace(settled, version=self.partition_table.version + 1)

    def trim_partitions(self, version: int, partitions) -> None:
        """Master (any thread): the owners of ``partitions`` hold them with every new replica in
        sync, by table ``version``: their old replicas may go (a newer table since: nothing)."""
        partitions = list(partitions)

        def trim():
            if self.state is not State.MEMBER or not self.is_master or self.partition_table.version != version:
                return
            data = sum(1 for m in self._members if m.data)
            self.partition_table = trimmed(self.partition_table, partitions, data)
            self._publish(self._members)

        self._post(trim)

    def _take_table(self, wire) -> None:
        """A member list's partition table, if newer than the one held. A table of another shape
        than this member's config is followed, and said once (the cluster's master planned it)."""
        table = received_table(wire)
        if table is not None and table.version > self.partition_table.version:
            self.partition_table = table
            shape = (table.partitions, table.backup_count)
            if shape != self._shape and shape != self._told_shape:
                self._told_shape = shape
                log.warning("this member's config says partitions = %d, backup_count = %d, but the cluster's "
                            "partition table has partitions = %d, backup_count = %d (its first master's); this "
                            "member follows the cluster's: set the same values on every member",
                            *self._shape, *shape)

    def _rejoin(self, target: tuple | None = None) -> None:
        """Leave the member list and join again; ``target``: the master of a cluster to merge into."""
        # The table goes before the epoch moves: the data layer reads the epoch, the table, and the
        # epoch again, so a table it takes with a new epoch is never the one from before.
        self.partition_table = empty_table(*self._shape)  # the cluster it joins has its own
        self.merging = target is not None  # into another cluster (a healed split), not back into its own
        self.epoch += 1  # the data layer drops what it held before it sees the next table
        self._merge_target = target
        self.listeners.emit_changes(self._members, [self.me], self.version, default=REMOVED)
        self._members = ()
        self.version = 0
        self._joined.clear()
        self._last_heard.clear()
        self._suspected.clear()
        for conn in self._links.values():
            conn.close("rejoining")
        self._links.clear()
        self._set_state(State.JOINING)
        self._join_started = self._next_tick = self.clock.monotonic()
        self._last_reasons = {}
        self._refusals = {}

    def _publish(self, members, departed=None) -> None:
        """Master only: a new list, version bumped, sent to every member.

        ``departed``: how the members gone from it left ({uuid: LEFT or CRASHED}).
        """
        self._apply(self.version + 1, members, force=True, departed=departed)
        # a member still being linked gets the list on its first heartbeat exchange
        self._send_to_others("members", self._members_body())

    def _send_to_others(self, message_type: str, body) -> None:
        """Send to every other member over its outbound link, where that link is open."""
        for member in self._members:
            conn = self._links.get(member.uuid)
            if member.uuid != self.me.uuid and conn is not None and conn.is_open:
                self._send(conn, message_type, body)

    def _remove(self, uuids: set, reason: str, *, how: str = CRASHED) -> None:
        """Master: remove ``uuids`` (``reason`` for the log; ``how`` for listeners: CRASHED or LEFT)."""
        gone = [m for m in self._members if m.uuid in uuids]
        if not gone:
            return
        for member in gone:
            log.warning("removing member %s: %s", member, reason)
            conn = self._links.get(member.uuid)
            if conn is not None and conn.is_open:
                self._send(conn, "removed", {"reason": reason})
            try:
                self.discovery.member_dead(member.address)
            except Exception:
                log.exception("discovery could not prune %s", member)
        self._publish([m for m in self._members if m.uuid not in uuids], {m.uuid: how for m in gone})

    # -- links, heartbeats and failure detection -----------------------------------------

    def _ensure_link(self, member: Member) -> None:
        conn = self._links.get(member.uuid)
        if conn is not None and conn.is_open or member.uuid in self._connecting:
            return
        future = self.transport.connect(member.address)
        self._connecting[member.uuid] = future
        future.add_done_callback(lambda done: self._post(lambda: self._link_done(member, done)))

    def _link_done(self, member: Member, done: Future) -> None:
        self._connecting.pop(member.uuid, None)
        if all(m.uuid != member.uuid for m in self._members):
            if not done.exception():
                done.result().close("no longer a member")
            return
        error = done.exception()
        if error is not None:
            self._member_unreachable(member.uuid, f"cannot connect: {error}")
            return
        conn = done.result()
        if conn.peer_info.get("uuid") != member.uuid:
            conn.close("another process answers at that address")
            self._member_unreachable(member.uuid, "another process answers at its address")
            return
        conn.attachment = member.uuid
        self._links[member.uuid] = conn
        self._send(conn, "hb", {"uuid": self.me.uuid, "version": self.version})

    def on_connection_closed(self, conn) -> None:
        """The transport's ``on_close`` (IO thread)."""
        self._post(lambda: self._link_closed(conn))

    def _link_closed(self, conn) -> None:
        self._clients.discard(conn)
        uuid = conn.peer_info.get("uuid")
        if self._links.get(uuid) is conn:
            del self._links[uuid]
        if self.state is not State.MEMBER or all(m.uuid != uuid for m in self._members) or uuid == self.me.uuid:
            return
        if conn.close_reason and not conn.closed_by_peer:
            return  # we closed it on purpose
        member = next(m for m in self._members if m.uuid == uuid)
        self._ensure_link(member)  # a failed reconnect confirms the member is gone

    def _member_unreachable(self, uuid: str, reason: str) -> None:
        if self.state is not State.MEMBER:
            return
        self._member_dead(uuid, reason)

    def _heartbeat(self, now: float) -> None:
        gap = now - self._last_tick
        self._last_tick = now
        if gap > max(2 * self.heartbeat_interval, self.failure_timeout / 2):
            if gap >= self.failure_timeout and self.state is State.MEMBER and len(self._members) > 1:
                # The others heard nothing for failure_timeout: they removed this member and went
                # on (a new master, a new table, writes it never saw). Carrying on with its old view,
                # a paused master would claim the larger cluster, and the others would merge into it
                # and its stale data. It joins again instead, as a newcomer.
                log.warning("this member was paused or starved for %.1f s, past failure_timeout (%.1f s): the "
                            "others have removed it; joining again", gap, self.failure_timeout)
                self._rejoin()
                return
            log.warning("this member was paused or starved for %.1f s; not blaming the others for it", gap)
            for uuid in self._last_heard:
                self._last_heard[uuid] = now
        body = {"uuid": self.me.uuid, "version": self.version}
        probing = dict(body, probe=now)  # (now and then: the member echoes it at once, for a round trip)
        for member in self._members:
            if member.uuid == self.me.uuid:
                continue
            conn = self._links.get(member.uuid)
            if conn is not None and conn.is_open:
                probe = now - self._probed_at.get(member.uuid, 0.0) >= _PROBE_EVERY
                if probe:
                    self._probed_at[member.uuid] = now
                self._send(conn, "hb", probing if probe else body)
            else:
                self._ensure_link(member)
        for uuid, heard in list(self._last_heard.items()):
            silent = now - heard
            if silent > self.failure_timeout:
                self._member_dead(uuid, f"no heartbeat for {silent:.1f} s (failure_timeout {self.failure_timeout} s)")

    def _member_dead(self, uuid: str, reason: str) -> None:
        if uuid == self.me.uuid or all(m.uuid != uuid for m in self._members):
            return
        if self.is_master:
            self._remove({uuid}, reason)
            return
        self._suspected.add(uuid)
        alive = [m for m in self._members if m.uuid not in self._suspected]
        master = self.master()
        if master is not None and master.uuid in self._suspected:
            if alive and alive[0].uuid == self.me.uuid:
                log.warning("master %s is gone (%s); %s takes over as master", master, reason, self.me)
                gone = {m.uuid for m in self._members} - {m.uuid for m in alive}
                for member in self._members:
                    if member.uuid in gone:
                        try:
                            self.discovery.member_dead(member.address)
                        except Exception:
                            log.exception("discovery could not prune %s", member)
                self._publish(alive, {uuid: CRASHED for uuid in gone})
            return
        conn = self._links.get(master.uuid) if master else None
        if conn is not None and conn.is_open:
            self._send(conn, "suspect", {"uuid": uuid, "reason": reason})

    def _send(self, conn, message_type: str, body) -> None:
        try:
            messaging.send(conn, message_type, body)
        except GridError as exc:
            log.debug("could not send %s to %r: %s", message_type, conn, exc)

    # -- merging clusters that found each other ------------------------------------------------

    def _look_for_other_clusters(self) -> None:
        """Master: ask discovered addresses outside our list which cluster they are in.

        Whichever side sees the other starts the merge (visibility is often one-way): the
        smaller cluster moves into the larger, told by the larger one if it cannot see it.
        A discovered address that cannot be reached for ``failure_timeout`` is pruned from
        discovery (a registry entry left by a process that is gone, member or not).
        """
        known = {m.address for m in self._members}
        try:
            strangers = [tuple(a) for a in self.discovery.candidates() if tuple(a) not in known]
        except Exception as exc:
            log.debug("merge check: discovery failed: %s", exc)
            return
        for address in list(self._unreachable_since):
            if address not in strangers:
                del self._unreachable_since[address]
        for address in strangers:
            self._probe_other_cluster(address)

    def _probe_other_cluster(self, address: tuple) -> None:
        def connected(done: Future) -> None:  # IO thread
            if done.cancelled():
                return
            error = done.exception()
            if error is not None:
                self._post(lambda: self._stranger_unreachable(address, error))
                return
            conn = done.result()
            reply = messaging.request(conn, "who", None)
            reply.add_done_callback(lambda answered: self._post(lambda: self._merge_answer(conn, answered)))

        self.transport.connect(address).add_done_callback(connected)

    def _stranger_unreachable(self, address: tuple, error: BaseException) -> None:
        if isinstance(error, HandshakeFailed):  # it answers, and refuses us: not ours to prune
            self._unreachable_since.pop(address, None)
            return
        now = self.clock.monotonic()
        since = self._unreachable_since.setdefault(address, now)
        if now - since >= self.failure_timeout:
            del self._unreachable_since[address]
            log.info("discovered address %s has been unreachable for %.0f s (%s); forgetting it",
                     format_address(address), now - since, error)
            self._discovery_call(self.discovery.member_dead, address)

    def _merge_answer(self, conn, answered: Future) -> None:
        conn.close("merge probe done")
        self._unreachable_since.pop(conn.remote, None)
        if answered.exception() is not None or self.state is not State.MEMBER or not self.is_master:
            return
        other = answered.result()
        if other.get("state") != "member" or not other.get("master"):
            return
        if any(m.uuid == other.get("uuid") for m in self._members):
            return
        target = tuple(other["master"])
        ours = {m.uuid for m in self._members}
        if target == self.me.address or any(m.address == target for m in self._members) or \
                ours & set(other.get("members") or ()):
            # A member this cluster removed (frozen, cut off; its master's, too) that has not
            # noticed yet: its view still lists members of this cluster. It rejoins by itself.
            return
        if tuple(other.get("address") or ()) != target:
            # Only a master speaks for its cluster: a member may answer from a view gone stale
            # (removed while frozen, its master dead since). Its master is asked instead.
            self._probe_other_cluster(target)
            return
        theirs = (-other["size"], target)
        ours = (-len(self._members), self.me.address)
        if theirs == ours:
            return
        if theirs > ours:
            # We are the larger (or older) cluster: they come to us. Tell their master, which
            # may not see us at all (a missing registry entry, a one-way split).
            self._tell_to_merge(tuple(other["master"]))
            return
        log.warning("another cluster of %d members (master %s) found; this cluster of %d merges into it",
                    other["size"], format_address(target), len(self._members))
        self._send_to_others("merge", {"target": list(target)})
        self._rejoin(target)

    def _tell_to_merge(self, their_master: tuple) -> None:
        def connected(done: Future) -> None:  # IO thread
            if done.cancelled() or done.exception() is not None:
                return
            conn = done.result()
            try:
                messaging.send(conn, "merge_into", {"target": list(self.me.address)})
            except GridError:
                pass
            self.transport.call_later(2 * self.heartbeat_interval, conn.close, "merge request sent")

        log.info("a smaller cluster (master %s) does not see this one; asking it to merge in",
                 format_address(their_master))
        self.transport.connect(their_master).add_done_callback(connected)

    def _on_merge_into(self, conn, body) -> None:
        """Another cluster's master says its cluster is the larger: check that, then merge into it."""
        target = tuple(body["target"])

        def handle():
            if self.state is State.MEMBER and self.is_master and all(m.address != target for m in self._members):
                self._probe_other_cluster(target)  # merges only if it really is the larger

        self._post(handle)

    def _on_merge(self, conn, body) -> None:
        def handle():
            master = self.master()
            if self.state is State.MEMBER and master and conn.peer_info.get("uuid") == master.uuid:
                log.warning("the master merges this cluster into the one at %s; rejoining",
                            format_address(tuple(body["target"])))
                self._rejoin(tuple(body["target"]))

        self._post(handle)

    def _discovery_call(self, fn, *args) -> None:
        """Call discovery; a failure is logged once (until it changes), never as a flood of tracebacks."""
        try:
            fn(*args)
        except Exception as exc:
            self._discovery_failed(exc)
            return
        self._discovery_problem = None

    def _discovery_failed(self, exc: BaseException) -> None:
        problem = f"{type(exc).__name__}: {exc}"
        if problem != self._discovery_problem:
            self._discovery_problem = problem
            log.warning("discovery: %s", problem)

    # -- leaving ------------------------------------------------------------------------------

    def _leave(self, done: Future) -> None:
        if self.state is not State.MEMBER:
            done.set_result(None)
            return
        self._set_state(State.LEAVING)
        others = [m for m in self._members if m.uuid != self.me.uuid]
        if self.is_master or not others:
            self._departures.record(self.me.uuid, LEFT)
            self._send_to_others("members", {"version": self.version + 1, "members": [m.to_wire() for m in others],
                                             "departed": self._departures.to_wire()})
            done.set_result(None)
            return
        conn = self._links.get(self.master().uuid)
        if conn is None or not conn.is_open:
            done.set_exception(GridError("no link to the master"))
            return
        future = messaging.request(conn, "leave", {"uuid": self.me.uuid})
        future.add_done_callback(lambda f: done.set_exception(f.exception()) if f.exception() else done.set_result(None))

    # -- handlers (IO thread: quick, or post to the membership thread) -------------------------

    def _on_who(self, conn, body) -> dict:
        master = self.master()
        return {
            "uuid": self.me.uuid,
            "address": list(self.me.address),
            "state": "member" if self.state is State.MEMBER else "joining",
            "master": list(master.address) if master and self.state is State.MEMBER else None,
            "size": len(self._members),
            "version": self.version,
            "members": [m.uuid for m in self._members],
        }

    def _on_join(self, conn, body) -> Future:
        try:
            joiner = Member.from_wire(body["member"])
        except Exception as exc:  # answered with this error by the router
            raise messaging.MalformedMessage(f"a 'join' body is {{'member': member info}}, not {body!r:.100}: "
                                             f"{type(exc).__name__}: {exc}") from exc
        reply: Future = Future()
        self._post(lambda: self._admit(conn, joiner, reply))
        return reply

    def _admit(self, conn, joiner: Member, reply: Future) -> None:
        if self.state is not State.MEMBER:
            reply.set_result({"ok": False, "reason": f"{self.me} is {self.state.value}"})
            return
        if not self.is_master:
            reply.set_result({"ok": False, "redirect": list(self.master().address)})
            return
        members = list(self._members)
        if any(m.uuid == joiner.uuid for m in members):
            reply.set_result({"ok": True, "version": self.version, "members": [m.to_wire() for m in members],
                              "partitions": self.partition_table.to_wire()})
            return
        replaced = [m for m in members if m.address == joiner.address]
        if replaced:
            log.info("%s restarted at the same address; replacing its old entry", joiner)
        members = [m for m in members if m.address != joiner.address] + [joiner]
        conn.attachment = joiner.uuid
        log.info("admitting %s (%d members)", joiner, len(members))
        # The old entry's process no longer holds its address, and it never said goodbye.
        self._publish(members, {m.uuid: CRASHED for m in replaced})
        reply.set_result({"ok": True, "version": self.version, "members": [m.to_wire() for m in self._members],
                          "partitions": self.partition_table.to_wire()})

    def _on_members(self, conn, body) -> None:
        members = tuple(Member.from_wire(m) for m in body["members"])
        departed = departures_from_wire(body.get("departed"))  # absent from an older master: clean leaves
        table = body.get("partitions")  # absent from an older master
        self._post(lambda: self._receive_members(body["version"], members, departed, table))

    def _receive_members(self, version: int, members, departed, table=None) -> None:
        if self.state is not State.MEMBER:
            return
        if not self.is_master:  # first: the list's push to this member's clients carries it
            self._take_table(table)
        if version > self.version:
            self._apply(version, members, departed=departed)

    def _on_heartbeat(self, conn, body) -> None:
        uuid = body["uuid"]
        if uuid in self._last_heard:
            self._last_heard[uuid] = self.clock.monotonic()
        if "probe" in body:  # (on the IO thread, at once: the round trip is the link's, not a tick's)
            self._send(conn, "hb_echo", {"uuid": self.me.uuid, "probe": body["probe"]})
        self._post(lambda: self._check_heartbeat(conn, uuid, body["version"]))

    def _on_heartbeat_echo(self, conn, body) -> None:
        probe, uuid = body["probe"], conn.peer_info.get("uuid")
        if isinstance(probe, (int, float)) and isinstance(uuid, str) and uuid == body.get("uuid"):
            rtts = self.heartbeat_rtts.get(uuid)
            if rtts is None:
                rtts = self.heartbeat_rtts[uuid] = collections.deque(maxlen=20)
            rtts.append(self.clock.monotonic() - probe)

    def _check_heartbeat(self, conn, uuid: str, version: int) -> None:
        if self.state is not State.MEMBER or not self.is_master:
            return
        if all(m.uuid != uuid for m in self._members):
            self._send(conn, "removed", {"reason": "not a member of this cluster (removed earlier)"})
        elif version < self.version:
            self._send(conn, "members", self._members_body())

    def _on_suspect(self, conn, body) -> None:
        self._post(lambda: self._check_suspect(body["uuid"], body.get("reason", "")))

    def _check_suspect(self, uuid: str, reason: str) -> None:
        if not self.is_master or uuid not in self._last_heard:
            return
        conn = self._links.get(uuid)
        silent = self.clock.monotonic() - self._last_heard[uuid]
        if conn is None or not conn.is_open or silent > 2 * self.heartbeat_interval:
            self._remove({uuid}, f"reported by another member: {reason}")

    def _on_leave(self, conn, body) -> Future:
        reply: Future = Future()

        def handle():
            if self.is_master:
                self._remove({body["uuid"]}, "left the cluster", how=LEFT)
            reply.set_result(True)

        self._post(handle)
        return reply

    def _on_removed(self, conn, body) -> None:
        def handle():
            if self.state is State.MEMBER and conn.peer_info.get("uuid") == getattr(self.master(), "uuid", None):
                log.warning("removed from the cluster by the master: %s", body.get("reason"))
                self._rejoin()

        self._post(handle)

    def _on_client_hello(self, conn, body) -> Future:
        reply: Future = Future()

        def handle():
            if self.state is not State.MEMBER:
                reply.set_exception(GridError(f"{self.me} is not a member yet ({self.state.value})"))
                return
            self._clients.add(conn)
            reply.set_result(self._members_body())

        self._post(handle)
        return reply


__all__ = ["Membership", "State"]
