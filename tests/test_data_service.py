"""The member data service around its DataNode: which table it follows, and when it starts over."""

from __future__ import annotations

import pytest

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


class TwoMembers:
    """This member ("me") owns every partition, "b" backs each up."""

    def __init__(self, partitions: int = 7):
        self.me = Member("me", ("127.0.0.1", 1))
        self.other = Member("b", ("127.0.0.1", 2))
        self.epoch = 0
        self.table = PartitionTable(1, partitions, 1, tuple(("me", "b") for _ in range(partitions)))

    def partitions(self) -> PartitionTable:
        return self.table

    def members(self):
        return [self.me, self.other]


class FromB:
    peer_info = {"uuid": "b", "role": "member"}


def owning_service(router, sent) -> DataService:
    """A service that owns every partition of TwoMembers (its first table asked "b", which holds none)."""
    service = DataService(router=router, transport=None, membership=TwoMembers())
    service._send = lambda uuid, message_type, body: sent.append((uuid, message_type, body))
    wait_for(lambda: service.node.table.version == 1, 5)
    router.handlers["data.batch"](FromB(), [("data.none", (p, 1)) for p in range(7)])
    assert not service.node.wanting
    sent.clear()
    return service


def test_a_batch_of_writes_goes_to_its_backup_as_one_message_and_is_acknowledged_by_one():
    """put_all: 1000 keys made 1000 replication messages to the backup and 1000 acks back, which
    cost the members 40 µs a key (the bench's put_all row stood at 0.48x a redis pipeline)."""
    from grid.data.store import MAP, Op

    router, sent = Router(), []
    service = owning_service(router, sent)
    try:
        items = [(key % 7, Op(MAP, "m", "set", (b"k%d" % key, b"v"), f"call-{key}", 1)) for key in range(50)]
        done = service.submit_many(items)
        assert [(uuid, message_type) for uuid, message_type, _ in sent] == [("b", "data.batch")]
        records = sent[0][2]
        assert [message_type for message_type, _ in records] == ["data.rep"] * 50
        assert not done.done(), "acknowledged before its backup applied it"

        acks = [("data.ack", (write_id, "ok", record.partition)) for _, (write_id, record) in records]
        router.handlers["data.batch"](FromB(), acks[:49])
        assert not done.done()
        router.handlers["data.batch"](FromB(), acks[49:])  # (a batch of one is a batch too)
        assert done.result(5) == [(True, None)] * 50
    finally:
        service.close()


def test_a_malformed_batch_is_refused_whole_and_a_failing_item_spares_the_others():
    from grid.data.store import MAP, Op
    from grid.errors import GridError

    router, sent = Router(), []
    service = owning_service(router, sent)
    try:
        done = service.submit_many([(p, Op(MAP, "m", "set", (b"k%d" % p, b"v"), f"c{p}", 1)) for p in range(2)])
        (write_a, record_a), (write_b, record_b) = [body for _, body in sent[0][2]]
        for bad in ("x", [("data.op", ())], [("data.ack",)], [("data.batch", [])]):
            with pytest.raises(GridError, match="'data.batch' body"):
                router.handlers["data.batch"](FromB(), bad)
        with pytest.raises(ValueError):  # the broken item is said; the good one after it still counts
            router.handlers["data.batch"](FromB(), [("data.ack", (write_a, "ok", 0)), ("data.ack", (1,)),
                                                    ("data.ack", (write_b, "ok", 1))])
        assert done.result(5) == [(True, None)] * 2
    finally:
        service.close()
