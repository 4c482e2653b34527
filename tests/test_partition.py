"""Network splits under the simulator: each side goes on alone, and heal() makes one cluster again.

``LocalCluster.partition`` / ``block`` / ``heal`` cut links inside each peer's transport
(sim/faults.py, grid/net/faults.py); these tests run real member processes on loopback.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest

import grid
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

FAST = {"heartbeat_interval": 0.2, "failure_timeout": 1.5}
HEAL_TIMEOUT = 15  # seconds; measured heals take a few heartbeats plus a merge check (1 s)


@contextlib.contextmanager
def views(cluster):
    """One client per peer, each following that peer's own member list (clients are never cut)."""
    clients = {}
    try:
        for peer in cluster.peers:
            if peer.alive:
                clients[peer.index] = grid.connect(cluster.config(peer.index))
        yield clients
    finally:
        for client in clients.values():
            client.close()


def sides(clients) -> set[frozenset]:
    """The distinct member sets the peers see."""
    return {frozenset(m.uuid for m in client.members()) for client in clients.values()}


def one_cluster(clients, uuids) -> bool:
    masters = {client.members()[0].uuid for client in clients.values() if client.members()}
    return sides(clients) == {frozenset(uuids)} and len(masters) == 1


def split_and_heal(cluster, groups, rounds: int = 2) -> list[float]:
    """Split into ``groups``, wait until each side is a cluster of its own, heal; ``rounds`` times."""
    uuids = {p.uuid for p in cluster.peers}
    expected = {frozenset(cluster.peers[i].uuid for i in group) for group in groups}
    heal_times = []
    with views(cluster) as clients:
        wait_for(lambda: one_cluster(clients, uuids), 10, "one cluster to start with")
        for _ in range(rounds):
            cluster.partition(*groups)
            wait_for(lambda: sides(clients) == expected, 10, f"the split into {groups}")
            started = time.monotonic()
            cluster.heal()
            wait_for(lambda: one_cluster(clients, uuids), HEAL_TIMEOUT, "one cluster after heal()")
            heal_times.append(time.monotonic() - started)
    return heal_times


def test_a_two_one_split_heals(local_cluster):
    cluster = local_cluster(3, **FAST)
    split_and_heal(cluster, [[0, 1], [2]])
    assert "simulated network faults" in cluster.log(2)


def test_a_two_two_split_heals(local_cluster):
    cluster = local_cluster(4, **FAST)
    split_and_heal(cluster, [[0, 1], [2, 3]])


def test_a_one_way_split_heals(local_cluster):
    cluster = local_cluster(3, **FAST)
    uuids = {p.uuid for p in cluster.peers}
    with views(cluster) as clients:
        wait_for(lambda: one_cluster(clients, uuids), 10, "one cluster")
        cluster.block([2], [0, 1])  # 2 cannot reach 0 or 1; they still reach 2
        wait_for(lambda: not one_cluster(clients, uuids), 10, "the one-way split to cost 2 its place")
        cluster.heal()
        wait_for(lambda: one_cluster(clients, uuids), HEAL_TIMEOUT, "one cluster after heal()")


def test_a_split_with_missing_registry_entries_heals(local_cluster):
    cluster = local_cluster(3, join="registry", **FAST)
    uuids = {p.uuid for p in cluster.peers}
    with views(cluster) as clients:
        wait_for(lambda: one_cluster(clients, uuids), 10, "one cluster")
        cluster.partition([0, 1], [2])
        wait_for(lambda: len(sides(clients)) == 2, 10, "the split")
        for name in os.listdir(cluster.registry_dir):  # and a tmp cleaner wipes the registry
            os.remove(os.path.join(cluster.registry_dir, name))
        cluster.heal()
        wait_for(lambda: one_cluster(clients, uuids), HEAL_TIMEOUT, "one cluster after heal()")


def test_partition_names_every_live_peer(local_cluster):
    cluster = local_cluster(2, **FAST)
    from sim import SimError

    with pytest.raises(SimError, match=r"live peers \[1\] are in no group"):
        cluster.partition([0])
