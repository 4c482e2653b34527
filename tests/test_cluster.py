"""Real member processes (``python -m grid peer``) forming clusters under the simulator."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from concurrent.futures import Future

import pytest

import grid
from grid.net import messaging, wire
from grid.errors import NotConnected, SecurityError
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

FAST = {"heartbeat_interval": 0.2, "failure_timeout": 1.5}


@contextlib.contextmanager
def views(cluster, indexes=None):
    """One client per live peer, each following that peer's own member list."""
    indexes = [p.index for p in cluster.peers if p.alive] if indexes is None else indexes
    clients = {}
    try:
        for index in indexes:
            clients[index] = grid.connect(cluster.config(index))
        yield clients
    finally:
        for client in clients.values():
            client.close()


def agreed(clients, expected_uuids) -> bool:
    """Every client's view holds exactly ``expected_uuids`` with one and the same master."""
    masters = set()
    for client in clients.values():
        members = client.members()
        if {m.uuid for m in members} != set(expected_uuids):
            return False
        masters.add(members[0].uuid)
    return len(masters) == 1


def live_uuids(cluster):
    return {p.uuid for p in cluster.peers if p.alive}


@pytest.mark.parametrize("join", ["tcp", "file", "registry", "multicast"])
def test_five_peers_form_one_cluster_with_one_master(local_cluster, join):
    cluster = local_cluster(5, join=join)
    with views(cluster) as clients:
        wait_for(lambda: agreed(clients, live_uuids(cluster)), 15, f"5 {join} peers to agree on one cluster")
        master = clients[0].master()
        assert master.uuid in live_uuids(cluster)
        assert all(client.master() == master for client in clients.values())


def test_killed_member_is_removed_by_all(local_cluster):
    cluster = local_cluster(4, **FAST)
    with views(cluster) as clients:
        wait_for(lambda: agreed(clients, live_uuids(cluster)), 10, "formation")
        master_uuid = clients[0].master().uuid
        victim = next(p for p in cluster.peers if p.uuid != master_uuid)
        clients.pop(victim.index).close()
        cluster.kill(victim.index)
        wait_for(lambda: agreed(clients, live_uuids(cluster)), 10, "everyone to drop the killed member")
        assert clients[next(iter(clients))].master().uuid == master_uuid


def test_killed_master_is_replaced_by_the_next_oldest(local_cluster):
    cluster = local_cluster(4, **FAST)
    with views(cluster) as clients:
        wait_for(lambda: agreed(clients, live_uuids(cluster)), 10, "formation")
        order = [m.uuid for m in clients[0].members()]
        master = next(p for p in cluster.peers if p.uuid == order[0])
        clients.pop(master.index).close()
        cluster.kill(master.index)
        wait_for(lambda: agreed(clients, live_uuids(cluster)), 10, "a new master agreed by all")
        new_order = [m.uuid for m in next(iter(clients.values())).members()]
        assert new_order == order[1:], "the next oldest takes over and the order is kept"


def test_paused_member_is_removed_then_comes_back(local_cluster):
    cluster = local_cluster(3, **FAST)
    with views(cluster) as clients:
        wait_for(lambda: agreed(clients, live_uuids(cluster)), 10, "formation")
        master_uuid = clients[0].master().uuid
        victim = next(p for p in cluster.peers if p.uuid != master_uuid)
        others = {i: c for i, c in clients.items() if i != victim.index}
        everyone = live_uuids(cluster)
        cluster.pause(victim.index)
        wait_for(lambda: agreed(others, everyone - {victim.uuid}), 10, "the paused member to be removed")
        cluster.resume(victim.index)
        wait_for(lambda: agreed(clients, everyone), 10, "the resumed member to be back in every view")
        assert clients[0].master().uuid == master_uuid


def test_membership_events_arrive_in_order(local_cluster):
    cluster = local_cluster(2, **FAST)
    events = []
    with grid.connect(cluster.config(0)) as client:
        wait_for(lambda: len(client.members()) == 2, 10, "formation")
        client.add_membership_listener(lambda e: events.append((e.kind, e.member.uuid, e.reason)))
        added = cluster.add()
        wait_for(lambda: ("joined", added.uuid, "joined") in events, 10, "the joined event")
        cluster.stop(added.index)
        wait_for(lambda: ("left", added.uuid, "left") in events, 10, "the left event")
        assert events == [("joined", added.uuid, "joined"), ("left", added.uuid, "left")], \
            (events, cluster.log(0)[-4000:])


def test_registry_entries_written_removed_and_pruned(local_cluster):
    cluster = local_cluster(3, join="registry", **FAST)
    folder = cluster.registry_dir
    entry = lambda peer: os.path.join(folder, "%s_%d" % peer.address)  # noqa: E731
    wait_for(lambda: all(os.path.exists(entry(p)) for p in cluster.peers), 5, "three registry entries")
    with open(entry(cluster.peers[0])) as content:
        assert content.read().strip() == socket.gethostname()
    leaver, victim = cluster.peers[1], cluster.peers[2]
    cluster.stop(leaver.index)
    assert not os.path.exists(entry(leaver)), "a clean leave removes the entry"
    cluster.kill(victim.index)
    wait_for(lambda: not os.path.exists(entry(victim)), 10, "the dead member's entry to be pruned")
    assert os.path.exists(entry(cluster.peers[0]))


def test_two_clusters_on_one_multicast_group_stay_apart(local_cluster):
    first = local_cluster(3, join="multicast")
    second = local_cluster(3, join="multicast", multicast={"port": first.multicast_port})
    assert second.peers[0].config["multicast"]["port"] == first.multicast_port
    with views(first) as a, views(second) as b:
        wait_for(lambda: agreed(a, live_uuids(first)), 10, "the first cluster")
        wait_for(lambda: agreed(b, live_uuids(second)), 10, "the second cluster")


def test_wrong_secret_is_refused_and_logged_on_both_sides(local_cluster, caplog):
    cluster = local_cluster(2)
    config = dict(cluster.config(0), secret="not-the-secret")
    with pytest.raises(NotConnected, match="secrets differ"):
        grid.connect(config, timeout=1.0)
    assert "secrets differ" in caplog.text
    wait_for(lambda: "secrets differ" in cluster.log(0), 5, "the member to log the refusal")


def test_garbage_and_pickles_before_the_handshake_do_not_hurt_a_member(local_cluster, tmp_path):
    cluster = local_cluster(1)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payloads = [
        b"\x00garbage that is not a frame at all" * 10,
        wire.frame_bytes(wire.Kind.REQUEST, pickle.dumps(("who", Evil()))),
        wire.frame_bytes(wire.Kind.HELLO, pickle.dumps(Evil())),
        wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.Kind.HELLO, 0, 0, 2**31),
    ]
    for payload in payloads:
        with socket.create_connection(cluster.peers[0].address, timeout=5) as raw:
            raw.sendall(payload)
            raw.settimeout(5)
            data = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := raw.recv(4096):
                    data += chunk
            # closed by the member; at most a REFUSE came back, never a pickle
            assert not data or data[:2] == wire.MAGIC
    assert not marker.exists()
    with grid.connect(cluster.config(0)) as client:
        assert len(client.members()) == 1, "the member still serves after all that"


def test_required_member_absent_means_no_cluster(tmp_path):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        absent = "127.0.0.1:%d" % unused.getsockname()[1]
    config = tmp_path / "grid.json"
    config.write_text(json.dumps({"id": "req", "join": "tcp", "members": [absent], "required": absent,
                                  "port": 0, "interface": "127.0.0.1", "join_timeout": 0.5}))
    done = subprocess.run([sys.executable, "-m", "grid", "peer", "--procs", "1", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 3
    assert f"required member {absent} could not be reached" in done.stderr
    assert "grid peer ready" not in done.stdout


def test_binding_beyond_loopback_without_a_secret_is_refused():
    with pytest.raises(SecurityError, match="GRID_SECRET"):
        grid.Peer({"interface": "0.0.0.0", "join": "tcp"})


def test_members_command_prints_the_member_list(local_cluster):
    cluster = local_cluster(2)
    env = dict(os.environ, GRID=cluster.write_client_config())
    done = subprocess.run([sys.executable, "-m", "grid", "members"], capture_output=True, text=True,
                          timeout=30, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "\tmaster\t" in lines[0]
    assert {line.split("\t")[-1] for line in lines} == live_uuids(cluster)


def test_in_process_member_and_default_connection(local_cluster, monkeypatch):
    cluster = local_cluster(1)
    config = dict(cluster.config(), port=0)
    with grid.connect(config, member=True) as me:
        assert len(me.members()) == 2
        monkeypatch.setenv("GRID", cluster.write_client_config())
        default = grid.cluster()
        try:
            assert grid.cluster() is default
            wait_for(lambda: len(default.members()) == 2, 5, "the default connection to see both")
        finally:
            default.close()


def test_multicast_client_finds_the_members(local_cluster):
    cluster = local_cluster(2, join="multicast")
    config = {"id": cluster.cluster_id, "secret": cluster.secret, "join": "multicast",
              "interface": "127.0.0.1", "multicast": {"port": cluster.multicast_port}}
    with grid.connect(config, timeout=10) as client:
        wait_for(lambda: {m.uuid for m in client.members()} == live_uuids(cluster), 5, "both members")


def test_supervisor_runs_n_members_and_restarts_one_that_dies(tmp_path):
    config = tmp_path / "grid.json"
    registry = tmp_path / "registry"
    config.write_text(json.dumps({"id": "procs", "secret": "s3", "join": "tcp", "members": {"path": f"{registry}/"},
                                  "port": 0, "interface": "127.0.0.1", "join_timeout": 0.3}))
    supervisor = subprocess.Popen([sys.executable, "-m", "grid", "peer", "--procs", "2", "--config", str(config)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready = [supervisor.stdout.readline() for _ in range(2)]
        assert all(line.startswith("grid peer ready 127.0.0.1:") for line in ready), ready
        pids = [int(line.split("pid=")[1].split()[0]) for line in ready]
        os.kill(pids[0], signal.SIGKILL)
        again = supervisor.stdout.readline()
        assert again.startswith("grid peer ready "), "a replacement member comes up"
        assert int(again.split("pid=")[1].split()[0]) not in pids
    finally:
        supervisor.terminate()
        assert supervisor.wait(15) == 0
        supervisor.stdout.close()
    assert not os.listdir(registry), "members left cleanly and removed their entries"


def test_two_clusters_that_find_each_other_merge(tmp_path):
    files = [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"]
    base = {"id": "merge", "secret": "m", "join": "tcp", "port": 0, "interface": "127.0.0.1",
            "join_timeout": 0.2, "heartbeat_interval": 0.2, "failure_timeout": 2.0}
    peers = []
    try:
        # a cluster of two (a, b) and a lone one (c), unaware of each other
        for index, members_file in enumerate(files):
            peers.append(grid.Peer(dict(base, members={"path": str(members_file)})).start(10))
            if index == 0:
                files[1].write_text("%s:%d\n" % peers[0].address)
        wait_for(lambda: len(peers[0].members()) == 2 and len(peers[2].members()) == 1, 5, "two clusters")
        files[2].write_text("%s:%d\n" % peers[0].address)  # the split heals: c can see a
        files[0].write_text("%s:%d\n" % peers[2].address)  # and a can see c
        everyone = {p.uuid for p in peers}
        wait_for(lambda: all({m.uuid for m in p.members()} == everyone for p in peers), 10, "one merged cluster")
        assert {p.master().uuid for p in peers} == {peers[0].uuid}, "the smaller cluster joins the larger"
    finally:
        for peer in peers:
            peer.close()


def test_a_script_that_forgets_to_close_its_connection_still_exits(local_cluster, tmp_path):
    cluster = local_cluster(1)
    env = dict(os.environ, GRID=cluster.write_client_config())
    done = subprocess.run([sys.executable, "-c", "import grid; print(len(grid.connect().members()))"],
                          capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


def test_a_client_whose_member_dies_right_after_answering_its_hello_links_again(local_cluster, monkeypatch):
    """The member a client (re)connected to closed the link after its hello answer came and before
    the client took that link as its own: the close was ignored (not its link yet) and the client
    kept the closed one, reconnecting never (an embedded executor whose members a poison task
    killed one after the other found no member for failure_timeout, though new ones ran)."""
    from grid.cluster import link as link_module

    cluster = local_cluster(1, **FAST)
    closed = []  # the link's on_close calls
    on_close = link_module.ClusterLink._on_close

    def noting_close(self, conn):
        on_close(self, conn)
        closed.append(conn)

    class Messaging:  # the first hello: answered, then the link closes before _connect takes it
        first = True

        def __getattr__(self, name):
            return getattr(messaging, name)

        def request(self, conn, message_type, body):
            reply = messaging.request(conn, message_type, body)
            if message_type != "client_hello" or not Messaging.first:
                return reply
            Messaging.first = False
            answer = reply.result(10)
            conn.close("the member died just after answering")
            wait_for(lambda: conn in closed, 10, "the close to reach the client's link")
            done = Future()
            done.set_result(answer)
            return done

    monkeypatch.setattr(link_module.ClusterLink, "_on_close", noting_close)
    monkeypatch.setattr(link_module, "messaging", Messaging())
    with grid.connect(cluster.config()) as client:
        wait_for(lambda: closed and client._link._conn is not closed[0] and client._link._conn.is_open, 10,
                 "the client to link again")
        assert [m.uuid for m in client.members()] == [cluster.peers[0].uuid]
