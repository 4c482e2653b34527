"""The master's partition table reaches every member and client, and follows joins and deaths."""

from __future__ import annotations

import collections

import pytest

import grid
from tests.conftest import wait_for
from tests.test_cluster import FAST, views

pytestmark = pytest.mark.slow

TIMEOUT = 30


def tables(clients) -> list:
    return [client.partitions() for client in clients.values()]


def settled(clients, data_uuids: set, backup_count: int = 1):
    """The one table every view holds, once it covers exactly ``data_uuids``; else None."""
    seen = tables(clients)
    first = seen[0]
    if any(table != first for table in seen) or not first.replicas:
        return None
    if first.members() != data_uuids:
        return None
    width = min(backup_count + 1, len(data_uuids))
    return first if all(len(row) == width for row in first.replicas) else None


def test_every_member_and_client_holds_the_masters_table_through_a_join_and_a_kill(local_cluster):
    cluster = local_cluster(3, **FAST)
    lite = cluster.add(data=False)  # a lite member computes but holds no partitions
    uuids = {peer.uuid for peer in cluster.peers}
    data_uuids = uuids - {lite.uuid}
    with views(cluster) as clients:
        table = wait_for(lambda: settled(clients, data_uuids), TIMEOUT, "one table on 3 data members everywhere")
        assert table.partitions == 271 and table.backup_count == 1
        owners = collections.Counter(row[0] for row in table.replicas)
        assert sorted(owners.values()) == [90, 90, 91], owners
        assert not table.owned_by(lite.uuid) and not table.backed_up_by(lite.uuid)
        key = ("user", 42)
        client = next(iter(clients.values()))
        assert client.partition_of(key) == grid.partition_of(key) and table.owner(client.partition_of(key)) in data_uuids

        victim = next(peer for peer in cluster.peers if peer.uuid in data_uuids and peer.index != 0)
        cluster.kill(victim.index)
        survivors = {index: client for index, client in clients.items() if index != victim.index}
        remaining = data_uuids - {victim.uuid}
        after = wait_for(lambda: settled(survivors, remaining), TIMEOUT, "a table without the killed member")
        assert after.version > table.version
        for before_row, after_row in zip(table.replicas, after.replicas):
            if before_row[0] == victim.uuid:
                assert after_row[0] == before_row[1], "its backup owns its partitions now"
        owners = collections.Counter(row[0] for row in after.replicas)
        assert sorted(owners.values()) == [135, 136], owners


def test_a_member_configured_with_another_table_shape_follows_the_cluster_and_says_so(local_cluster):
    cluster = local_cluster(2, **FAST)
    odd = cluster.add(partitions=100, backup_count=2)
    with views(cluster) as clients:
        uuids = {peer.uuid for peer in cluster.peers}
        table = wait_for(lambda: settled(clients, uuids), TIMEOUT, "one table on the 3 members everywhere")
        assert (table.partitions, table.backup_count) == (271, 1), "the cluster keeps its master's shape"
    line = wait_for(lambda: next((line for line in cluster.log(odd.index).splitlines()
                                  if "partitions = 100, backup_count = 2" in line), None),
                    TIMEOUT, "the odd member's warning")
    assert "partitions = 271, backup_count = 1" in line and "set the same values on every member" in line
    assert cluster.log(odd.index).count("this member follows the cluster's") == 1, "said once, not per push"
