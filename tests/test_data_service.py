"""The member data service around its DataNode: which table it follows, and when it starts over."""

from __future__ import annotations

from grid.cluster.members import Member
from grid.cluster.partitions import PartitionTable, empty_table
from grid.data.service import DataService

from .conftest import wait_for


class Router:
    def __init__(self):
        self.handlers = {}

    def register(self, message_type, handler):
        self.handlers[message_type] = handler


class RejoiningMembership:
    """A member list whose member rejoins (epoch moves, table emptied) just after one table read,
    as a member found removed after a pause does on its IO thread while the data thread reads."""

    def __init__(self, table: PartitionTable):
        self.me = Member("me", ("127.0.0.1", 1))
        self.epoch = 0
        self.table = table
        self.rejoin_after_next_read = False

    def partitions(self) -> PartitionTable:
        table = self.table
        if self.rejoin_after_next_read:
            self.rejoin_after_next_read = False
            self.table = empty_table(table.partitions, table.backup_count)
            self.epoch += 1
        return table

    def members(self):
        return [self.me]


def test_a_member_that_rejoins_starts_over_without_the_table_it_had_before():
    """The data thread read the table, the member rejoined, then the thread read the epoch: it
    dropped everything and took the old table into its new node, whose stale view made it vouch
    for messages sent before the pause (a pause test lost 153 acknowledged increments from that)."""
    old = PartitionTable(3, 3, 0, (("me",), ("me",), ("me",)))
    membership = RejoiningMembership(old)
    service = DataService(router=Router(), transport=None, membership=membership)
    try:
        wait_for(lambda: service.node.table.version == 3, 5)
        with service._lock:
            membership.rejoin_after_next_read = True
            service._follow_table()
            assert service.node.table.version == 0, "the new node must not follow the table from before"
        assert not service.node.replicas
    finally:
        service.close()
