"""Membership events say how a member went: ``event.reason`` is "left", "crashed" or "removed".

``event.kind`` stays "joined" or "left"; the reason travels with the member list the master
pushes, so clients (ClusterLink followers) get it as members do.
"""

from __future__ import annotations

import contextlib
import threading

import pytest

import grid
from grid.cluster.config import Config
from grid.cluster.members import Listeners, Member, MembershipEvent, departures_from_wire
from grid.net import messaging
from grid.net.address import format_address
from grid.net.faults import Faults
from grid.net.transport import Transport
from tests.conftest import wait_for

FAST = {"heartbeat_interval": 0.2, "failure_timeout": 1.5}
EVENT_WAIT = 15


def member(name: str, port: int) -> Member:
    return Member(uuid=name, address=("127.0.0.1", port))


class Recorder:
    """A membership listener that keeps (kind, member uuid, reason) of every event."""

    def __init__(self):
        self.events: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()

    def __call__(self, event) -> None:
        with self._lock:
            self.events.append((event.kind, event.member.uuid, getattr(event, "reason", None)))

    def departures(self) -> dict[str, str | None]:
        with self._lock:
            return {uuid: reason for kind, uuid, reason in self.events if kind == "left"}


# ------------------------------------------------------------------ the event and its wire form


def test_an_event_built_without_a_reason_reads_as_its_kind():
    one = member("a", 1)
    assert MembershipEvent("joined", one, (one,), 1).reason == "joined"
    assert MembershipEvent("left", one, (), 2).reason == "left"
    assert MembershipEvent("left", one, (), 2, "crashed").reason == "crashed"


def test_listeners_give_each_departure_its_reason():
    a, b, c, d = member("a", 1), member("b", 2), member("c", 3), member("d", 4)
    listeners = Listeners()
    recorder = Recorder()
    listeners.add(recorder)
    listeners.emit_changes((a, b, c), (a, d), 2, {"b": "crashed"})
    listeners.emit_changes((a, d), (), 3, default="removed")
    listeners.close()
    assert recorder.events == [("left", "b", "crashed"), ("left", "c", "left"), ("joined", "d", "joined"),
                               ("left", "a", "removed"), ("left", "d", "removed")]


@pytest.mark.parametrize(("wire", "expected"), [
    (None, {}),
    ("garbage", {}),
    ({"a": "left", "b": "crashed", "c": "removed"}, {"a": "left", "b": "crashed", "c": "removed"}),
    ({"a": "vanished", 3: "left", "b": 7}, {"a": "removed"}),
])
def test_departures_from_the_wire_are_checked(wire, expected):
    assert departures_from_wire(wire) == expected


# ------------------------------------------------------------------ a client and an older member


@contextlib.contextmanager
def fake_member(members):
    """A member that speaks only client_hello and pushes lists as a member before ``reason`` did."""
    router = messaging.Router()
    clients = []
    router.register("client_hello", lambda conn, body: clients.append(conn) or {
        "version": 1, "members": [m.to_wire() for m in members]})
    transport = Transport(cluster_id="events", secret="s", info={"uuid": members[0].uuid, "role": "member"},
                          on_frame=router.on_frame)
    try:
        address = transport.listen("127.0.0.1", 0)
        yield address, clients
    finally:
        transport.close()


def test_a_client_reads_a_push_without_reasons_as_left_and_with_them_as_given():
    first, second, third = member("first", 1), member("second", 2), member("third", 3)
    with fake_member([first, second, third]) as (address, clients):
        config = Config(id="events", secret="s", join="tcp", members=[format_address(address)],
                        interface="127.0.0.1", join_timeout=0.5)
        with grid.connect(config) as client:
            recorder = Recorder()
            client.add_membership_listener(recorder)
            conn = wait_for(lambda: clients and clients[0], 5, "the client's hello")
            messaging.send(conn, "members", {"version": 2, "members": [first.to_wire(), third.to_wire()]})
            wait_for(lambda: recorder.departures() == {"second": "left"}, 5, "second's departure")
            messaging.send(conn, "members", {"version": 3, "members": [first.to_wire()],
                                             "departed": {"second": "left", "third": "crashed"}})
            wait_for(lambda: len(recorder.departures()) == 2, 5, "third's departure")
            assert recorder.departures() == {"second": "left", "third": "crashed"}


# ------------------------------------------------------------------ real member processes


@contextlib.contextmanager
def followers(cluster):
    """One client per peer, each following that peer's own member list, with a Recorder each."""
    clients = {}
    try:
        for peer in cluster.peers:
            clients[peer.index] = grid.connect(cluster.config(peer.index))
        recorders = {}
        for index, client in clients.items():
            wait_for(lambda client=client: len(client.members()) == len(cluster.peers), EVENT_WAIT, "formation")
            recorders[index] = Recorder()
            client.add_membership_listener(recorders[index])
        yield clients, recorders
    finally:
        for client in clients.values():
            client.close()


def master_and_others(cluster, client):
    """The master's PeerProcess, and those of the other simulated peers, oldest first."""
    by_uuid = {peer.uuid: peer for peer in cluster.peers}
    order = [by_uuid[m.uuid] for m in client.members() if m.uuid in by_uuid]
    return order[0], order[1:]


def drop(clients, recorders, index) -> None:
    clients.pop(index).close()
    recorders.pop(index)


def all_saw(recorders, uuid, reason) -> bool:
    return all(recorder.departures().get(uuid) == reason for recorder in recorders.values())


@pytest.mark.slow
def test_a_member_that_leaves_cleanly_is_reported_left(local_cluster):
    cluster = local_cluster(3, **FAST)
    with followers(cluster) as (clients, recorders):
        master, (leaver, _) = master_and_others(cluster, clients[0])
        drop(clients, recorders, leaver.index)
        cluster.stop(leaver.index)
        wait_for(lambda: all_saw(recorders, leaver.uuid, "left"), EVENT_WAIT, "'left' on every follower")
        drop(clients, recorders, master.index)
        cluster.stop(master.index)
        wait_for(lambda: all_saw(recorders, master.uuid, "left"), EVENT_WAIT, "the master's 'left'")


@pytest.mark.slow
def test_a_killed_member_is_reported_crashed(local_cluster):
    cluster = local_cluster(3, **FAST)
    in_process = Recorder()
    with followers(cluster) as (clients, recorders), \
            grid.connect(dict(cluster.config(), port=0, **FAST), member=True) as own:
        wait_for(lambda: len(own.members()) == 4, EVENT_WAIT, "the in-process member to join")
        own.add_membership_listener(in_process)
        master, (victim, _) = master_and_others(cluster, clients[0])
        drop(clients, recorders, victim.index)
        cluster.kill(victim.index)
        wait_for(lambda: all_saw(recorders, victim.uuid, "crashed"), EVENT_WAIT, "'crashed' on every follower")
        wait_for(lambda: in_process.departures().get(victim.uuid) == "crashed", EVENT_WAIT, "'crashed' in a member")
        drop(clients, recorders, master.index)
        cluster.kill(master.index)
        wait_for(lambda: all_saw(recorders, master.uuid, "crashed"), EVENT_WAIT, "the master's 'crashed'")
        wait_for(lambda: in_process.departures().get(master.uuid) == "crashed", EVENT_WAIT,
                 "the master's 'crashed' in a member")


@pytest.mark.slow
def test_a_member_the_master_removed_sees_the_others_removed():
    base = {"id": "events-removed", "secret": "s", "join": "tcp", "interface": "127.0.0.1", "port": 0,
            "members": [], "join_timeout": 0.3, **FAST}
    with grid.Peer(base).start(10) as master:
        with grid.Peer(dict(base, members=[format_address(master.address)])).start(10) as follower:
            wait_for(lambda: len(master.members()) == 2 == len(follower.members()), EVENT_WAIT, "formation")
            seen_by_master, seen_by_follower = Recorder(), Recorder()
            master.membership.add_listener(seen_by_master)
            follower.membership.add_listener(seen_by_follower)
            # The master stops hearing the follower (the follower still hears the master): it
            # removes the follower, which is told so while it still thinks it is a member.
            follower_address = format_address(follower.address)
            master.transport.faults = Faults(refuse_from=[follower_address])
            wait_for(lambda: seen_by_master.departures().get(follower.uuid) == "crashed", EVENT_WAIT,
                     "the master's failure detector to remove the follower")
            wait_for(lambda: seen_by_follower.departures().get(master.uuid) == "removed", EVENT_WAIT,
                     "the follower to see the master 'removed' as it rejoins")
            master.transport.faults = None
