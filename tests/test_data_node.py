"""The member's data service state machine (``grid.data.node.DataNode``), over a network in a list.

Each test moves the messages by hand, so it can drop, hold back or reorder them: that is how a
dead owner, a paused ex-owner and a backup that missed a record are made. What it checks: a write
is answered only once every backup applied it; a backup of a newer table refuses an ex-owner;
the promoted backup holds every acknowledged write; a backup that missed a record catches up from
a snapshot; an owner that holds nothing gets the partition from its replicas.
"""

from __future__ import annotations

import pytest

from grid.cluster.partitions import PartitionTable
from grid.data.node import DataNode, NotOwner, Reply, Send
from grid.data.store import COUNTER, MAP, Op, StoreError

PARTITIONS = 3


def table(version: int, *rows) -> PartitionTable:
    """A table of PARTITIONS partitions; ``rows`` for the first ones, the rest like the last given."""
    rows = list(rows) + [rows[-1]] * (PARTITIONS - len(rows))
    return PartitionTable(version, PARTITIONS, max(len(row) for row in rows) - 1, tuple(tuple(row) for row in rows))


class Net:
    """DataNodes by name, and the messages between them, delivered when the test says."""

    def __init__(self, *names: str):
        self.nodes = {name: DataNode(name, PARTITIONS) for name in names}
        self.queue: list[tuple[str, Send]] = []  # (sender, message) in the order sent
        self.replies: dict = {}
        self.calls = 0

    def take(self, sender: str, out: list) -> None:
        for item in out:
            if isinstance(item, Reply):
                if item.token is None:  # the node's own write (an expiry, an eviction)
                    continue
                assert item.token not in self.replies, "a call is answered once"
                self.replies[item.token] = item
            else:
                self.queue.append((sender, item))

    def table(self, new: PartitionTable, *names: str) -> None:
        for name in names or self.nodes:
            self.take(name, self.nodes[name].take_table(new))

    def start(self, first: PartitionTable) -> None:
        """The first table: each owner asks its backups for its partitions, and they have none."""
        self.table(first)
        self.deliver()

    def op(self, name: str, partition: int, op: Op):
        self.calls += 1
        token = self.calls
        self.take(name, self.nodes[name].on_op(token, partition, op))
        return token

    def deliver(self, *, drop=lambda sender, message: False, limit: int = 1000) -> None:
        """Deliver every message (and those they cause), except the ones ``drop`` says."""
        for _ in range(limit):
            if not self.queue:
                return
            sender, message = self.queue.pop(0)
            if message.to not in self.nodes or drop(sender, message):
                continue
            node = self.nodes[message.to]
            kind, body = message.message_type, message.body
            if kind == "data.rep":
                out = node.on_replicate(sender, *body)
            elif kind == "data.ack":
                out = node.on_ack(sender, *body)
            elif kind == "data.snap":
                out = node.on_snapshot(sender, *body)
            elif kind == "data.snapped":
                out = node.on_snapshot_applied(sender, *body)
            elif kind == "data.want":
                out = node.on_want(sender, *body)
            elif kind == "data.none":
                out = node.on_none(sender, *body)
            else:
                raise AssertionError(f"unknown message {kind}")
            self.take(message.to, out)
        raise AssertionError("the messages never settle")

    def result(self, token):
        reply = self.replies[token]
        if reply.error is not None:
            raise reply.error
        return reply.result

    def read(self, name: str, partition: int, op: Op):
        token = self.op(name, partition, op)
        return self.result(token)


def add(delta: int, call: str, version: int = 1) -> Op:
    return Op(COUNTER, "hits", "add_and_get", (delta,), call, version)


def get(version: int = 1) -> Op:
    return Op(COUNTER, "hits", "get", table_version=version)


def test_a_write_is_answered_only_once_every_backup_applied_it():
    net = Net("a", "b", "c")
    net.start(table(1, ("a", "b", "c")))
    token = net.op("a", 0, add(5, "w1"))
    assert token not in net.replies, "not before the backups applied it"
    assert {message.to for _, message in net.queue} == {"b", "c"}

    net.deliver(drop=lambda sender, message: message.to == "c")  # c never hears of it
    assert token not in net.replies, "one backup is not enough"

    net.queue.clear()
    token = net.op("a", 0, add(1, "w2"))
    net.deliver()
    assert net.result(token) == 6, "c caught up (it missed w1) and both backups applied w2"
    assert net.nodes["c"].replicas[0].snapshot() == net.nodes["a"].replicas[0].snapshot()


def test_a_read_is_answered_at_once_and_an_op_at_a_non_owner_says_who_owns_it():
    net = Net("a", "b")
    net.start(table(1, ("a", "b")))
    assert net.read("a", 0, get()) == 0
    with pytest.raises(NotOwner, match="owned by a") as caught:
        net.read("b", 0, get())
    assert caught.value.table_version == 1


def test_a_bad_op_fails_with_the_stores_error_and_changes_nothing():
    net = Net("a", "b")
    net.start(table(1, ("a", "b")))
    with pytest.raises(StoreError, match="no operation"):
        net.read("a", 0, Op(MAP, "m", "frobnicate", (), "x", 1))
    assert not net.queue


def test_a_paused_ex_owner_cannot_acknowledge_a_write():
    """a owned partition 0 and paused; the cluster moved on (table 2: b owns, c backs up). A proxy
    that still routes by table 1 reaches a, which applies the write but cannot get it backed up."""
    net = Net("a", "b", "c")
    net.start(table(1, ("a", "c"), ("b", "c")))
    net.table(table(2, ("b", "c")), "b", "c")  # a never hears of it

    token = net.op("a", 0, add(7, "late"))
    net.deliver()
    assert token not in net.replies, "its backup follows a newer table: not acknowledged"
    net.table(table(2, ("b", "c")), "a")  # a catches up: the write moved away
    with pytest.raises(NotOwner):
        net.result(token)
    assert net.read("b", 0, get(2)) == 0, "the write was not acknowledged, and is nowhere else"


def test_the_promoted_backup_holds_every_acknowledged_write():
    net = Net("a", "b", "c")
    net.start(table(1, ("a", "b", "c")))
    acknowledged = 0
    for number in range(20):
        token = net.op("a", 0, add(number, f"w{number}"))
        net.deliver()
        acknowledged = net.result(token)
    unacknowledged = net.op("a", 0, add(1000, "lost"))  # a dies with its record on the wire
    net.queue.clear()
    del net.nodes["a"]

    net.table(table(2, ("b", "c")))
    net.deliver()
    assert net.read("b", 0, get(2)) == acknowledged == sum(range(20))
    assert unacknowledged not in net.replies
    # The proxy retries the unacknowledged write at the new owner, with its call id: applied once.
    retry = net.op("b", 0, add(1000, "lost", 2))
    net.deliver()
    assert net.result(retry) == acknowledged + 1000
    again = net.op("b", 0, add(1000, "lost", 2))
    net.deliver()
    assert net.result(again) == acknowledged + 1000, "a second retry applies nothing"
    assert net.nodes["c"].replicas[0].snapshot() == net.nodes["b"].replicas[0].snapshot()


def test_a_record_only_one_backup_got_does_not_survive_on_it_after_a_promotion():
    """a's last write reached b, not c, and a died: never acknowledged. c is promoted; b must end
    up holding what c holds, not the extra record (the next record would carry its number)."""
    net = Net("a", "b", "c")
    net.start(table(1, ("a", "b", "c")))
    token = net.op("a", 0, add(1, "w1"))
    net.deliver()
    assert net.result(token) == 1
    net.op("a", 0, add(10, "w2"))
    net.deliver(drop=lambda sender, message: message.to == "c" or message.to == "a")
    del net.nodes["a"]

    net.table(table(2, ("c", "b")))
    net.deliver()
    token = net.op("c", 0, add(100, "w3", 2))
    net.deliver()
    assert net.result(token) == 101
    assert net.nodes["b"].replicas[0].snapshot() == net.nodes["c"].replicas[0].snapshot()


def test_a_retry_while_the_first_try_waits_for_its_backup_waits_too():
    """The proxy's first try timed out (its backup's ack is slow) and it retried with the call id.
    The owner knows the call id, and used to answer the retry at once: acknowledged before the
    backup had it, so the owner's death lost it."""
    net = Net("a", "b")
    net.start(table(1, ("a", "b")))
    first = net.op("a", 0, add(7, "w"))
    retry = net.op("a", 0, add(7, "w"))
    assert first not in net.replies and retry not in net.replies, "not before the backup applied it"
    net.deliver()
    assert net.result(first) == net.result(retry) == 7, "answered together, applied once"


def test_a_retry_at_a_promoted_owner_waits_until_its_backups_hold_the_write():
    """b, a backup, got a's record of w (never acknowledged: c did not get it), and is promoted.
    The retry of w at b finds the call id applied; c gets it only from b's snapshot, so the retry
    is answered once c restored that snapshot, not before."""
    net = Net("a", "b", "c")
    net.start(table(1, ("a", "b", "c")))
    first = net.op("a", 0, add(1, "first"))
    net.deliver()
    assert net.result(first) == 1  # (every replica holds the partition now)
    net.op("a", 0, add(5, "w"))
    net.deliver(drop=lambda sender, message: message.to in ("c", "a"))
    del net.nodes["a"]
    net.table(table(2, ("b", "c")))  # b is promoted: a snapshot for c goes on the wire

    retry = net.op("b", 0, add(5, "w", 2))
    assert retry not in net.replies, "c does not hold w yet"
    net.deliver()
    assert net.result(retry) == 6
    assert net.nodes["c"].replicas[0].snapshot() == net.nodes["b"].replicas[0].snapshot()


def test_a_lost_record_or_snapshot_goes_again_after_a_while():
    """A message the links lost (a member takes a table a moment before the member list naming
    the member it must send to) left a write waiting, or a backup unsynced, until the table moved."""
    net = Net("a", "b")
    net.start(table(1, ("a", "b")))
    token = net.op("a", 0, add(3, "w"))
    net.deliver(drop=lambda sender, message: message.message_type in ("data.rep", "data.snap"))
    assert token not in net.replies
    net.take("a", net.nodes["a"].tick(1.0))
    net.deliver(drop=lambda sender, message: message.message_type == "data.snap")
    assert token not in net.replies, "not before it was unanswered for a while"
    net.take("a", net.nodes["a"].tick(2.5))
    net.deliver(drop=lambda sender, message: message.message_type == "data.snap")  # b wants; the snapshot is lost
    assert token not in net.replies
    net.take("a", net.nodes["a"].tick(5.0))
    net.deliver()
    assert net.result(token) == 3
    assert net.nodes["b"].replicas[0].snapshot() == net.nodes["a"].replicas[0].snapshot()
    assert not net.nodes["a"].tick(10.0), "nothing left to send"


def test_a_new_backup_starts_from_a_snapshot_and_follows_the_writes_after_it():
    net = Net("a", "b")
    net.start(table(1, ("a",)))
    for number in range(5):
        net.read("a", 0, add(1, f"w{number}"))  # no backup: answered at once
    net.table(table(2, ("a", "b")))
    net.deliver()
    token = net.op("a", 0, add(1, "after", 2))
    net.deliver()
    assert net.result(token) == 6
    assert net.nodes["b"].replicas[0].snapshot() == net.nodes["a"].replicas[0].snapshot()


def test_an_owner_that_holds_nothing_gets_the_partition_from_its_replicas_first():
    net = Net("a", "b", "d")
    net.start(table(1, ("a", "b")))
    token = net.op("a", 0, add(42, "w"))
    net.deliver()
    assert net.result(token) == 42
    net.table(table(2, ("d", "a", "b")))  # d joined and owns partition 0: it asks a and b
    with pytest.raises(NotOwner, match="receiving its data"):
        net.read("d", 0, get(2))
    net.deliver()
    assert net.read("d", 0, get(2)) == 42


def test_a_new_owner_asking_a_replica_that_lags_a_table_behind_still_gets_the_data():
    """A join: c takes partition 0 from a (b keeps its backup) and asks b for it before b has
    table 2. b used to answer "none" by its table 1 (c does not own it there), and c, told "none"
    by every replica, started the partition empty: every write in it was lost (and its snapshot
    then overwrote b's)."""
    net = Net("a", "b", "c")
    net.start(table(1, ("a", "b")))
    token = net.op("a", 0, add(42, "w"))
    net.deliver()
    assert net.result(token) == 42
    net.table(table(2, ("c", "b")), "a", "c")  # b hears of table 2 later
    net.deliver()  # c's want reaches b, which is still at table 1
    net.table(table(2, ("c", "b")), "b")
    net.deliver()
    assert net.read("c", 0, get(2)) == 42
    assert net.nodes["b"].replicas[0].snapshot()["structures"] == net.nodes["c"].replicas[0].snapshot()["structures"]


def test_a_partition_nobody_held_starts_empty_at_its_owner():
    net = Net("a")
    net.start(table(1, ("a",)))
    assert net.read("a", 1, get()) == 0


def test_a_rejoined_member_cannot_take_a_stale_copy_from_a_message_sent_before_it_paused():
    """b, a's backup, froze with a's record (table 1) unread; the cluster went on without it (table 2:
    a, c) and b rejoined with nothing (a new node). The old record reached the new b, which asked
    for the partition ("want"), and a sent it a snapshot though b backed up nothing by its table.
    Made owner by table 3, b then held that stale copy as if it had every write, and its snapshot
    overwrote a's newer data (a pause test lost 153 acknowledged increments this way)."""
    net = Net("a", "b", "c")
    net.start(table(1, ("a", "b")))
    token = net.op("a", 0, add(1, "w1"))
    held = [(sender, message) for sender, message in net.queue if message.to == "b"]  # b reads it later
    net.queue.clear()
    del net.nodes["b"]
    net.table(table(2, ("a", "c")))
    net.deliver()
    assert net.result(token) == 1
    net.nodes["b"] = DataNode("b", PARTITIONS)  # b rejoins: a new node, with no table yet
    net.queue += held
    net.deliver()
    for number in range(5):  # acknowledged after the old record reached b
        token = net.op("a", 0, add(1, f"after{number}", 2))
        net.deliver()
        acknowledged = net.result(token)
    net.table(table(3, ("b", "a")))
    net.deliver()
    assert net.read("b", 0, get(3)) == acknowledged == 6
    assert net.nodes["a"].replicas[0].snapshot()["structures"] == net.nodes["b"].replicas[0].snapshot()["structures"]


def test_a_write_in_flight_when_its_backup_leaves_waits_for_the_new_backup():
    """a's record of w was on its way to b when b left; table 2 names c instead. The write was
    answered at once (its only waiting backup was gone), held by a alone while c restored."""
    net = Net("a", "b", "c")
    net.start(table(1, ("a", "b")))
    token = net.op("a", 0, add(4, "w"))
    net.queue.clear()
    del net.nodes["b"]
    net.table(table(2, ("a", "c")))
    assert token not in net.replies, "not before c holds it"
    net.deliver()
    assert net.result(token) == 4
    assert net.nodes["c"].replicas[0].snapshot() == net.nodes["a"].replicas[0].snapshot()


def test_an_owner_waiting_for_its_data_takes_no_snapshot_sent_by_an_older_table():
    """b backed up partition 0 (table 1) and froze with a's snapshot unread; it rejoined (a new node)
    and table 3 made it the owner. Reading that old snapshot as the answer to its want, it took a
    stale copy, and its own snapshot then overwrote a's and c's newer data."""
    net = Net("a", "b", "c")
    net.start(table(1, ("a", "b")))
    old_snapshot = ("a", Send("b", "data.snap", (0, net.nodes["a"].replicas[0].snapshot())))
    net.nodes["b"] = DataNode("b", PARTITIONS)  # b rejoined with nothing
    net.table(table(2, ("a", "c")), "a", "c")
    net.deliver()
    token = net.op("a", 0, add(5, "w", 2))
    net.deliver()
    assert net.result(token) == 5
    net.queue.append(old_snapshot)  # read late, before b's want is answered
    net.table(table(3, ("b", "a", "c")))
    net.queue.insert(0, net.queue.pop())
    net.deliver()
    assert net.read("b", 0, get(3)) == 5
    assert all(net.nodes[name].replicas[0].snapshot()["structures"] == net.nodes["b"].replicas[0].snapshot()["structures"]
               for name in "ac")


def test_a_backup_a_table_ahead_of_its_owner_still_gets_the_write():
    """c took table 2 (a still owns partition 0) before a did, and refused a's record of table 1
    ("fenced"). a failed the write, and answered its retry from the stored result: acknowledged
    without c, which, promoted later, lost it. Now a waits, and sends it again by table 2."""
    net = Net("a", "b", "c")
    net.start(table(1, ("a", "b", "c")))
    net.table(table(2, ("a", "b", "c"), ("b", "a")), "b", "c")  # a hears of table 2 later
    token = net.op("a", 0, add(3, "w"))
    net.deliver()
    assert token not in net.replies, "not acknowledged without c"
    net.table(table(2, ("a", "b", "c"), ("b", "a")), "a")
    net.deliver()
    assert net.result(token) == 3
    assert net.nodes["c"].replicas[0].snapshot()["structures"] == net.nodes["a"].replicas[0].snapshot()["structures"]


def test_a_record_fenced_after_its_owner_caught_up_goes_again_at_once():
    """a sent its record by table 1, then took table 2 (still the owner) before b's "fenced" came
    back: nothing sent it again, and the write waited for good."""
    net = Net("a", "b")
    net.start(table(1, ("a", "b")))
    token = net.op("a", 0, add(2, "w"))
    record = [message for _, message in net.queue if message.message_type == "data.rep"]
    net.queue.clear()
    net.table(table(2, ("a", "b"), ("b", "a")), "b")
    net.take("a", net.nodes["a"].take_table(table(2, ("a", "b"), ("b", "a"))))
    net.queue.clear()  # (its own resend of the record is lost)
    net.queue += [("a", message) for message in record]  # b reads the old record now: "fenced"
    net.deliver()
    assert net.result(token) == 2


def test_a_record_of_the_owners_own_table_refused_is_not_sent_again_at_once():
    """Refused though sent by the owner's newest table (a member of another cluster with a table
    of the same number, before a merge): sending it again at once would bounce without end."""
    node = DataNode("a", PARTITIONS)
    node.take_table(table(2, ("a", "b")))
    node.on_none("b", 0, 2)  # (b held nothing: a starts the partition)
    out = node.on_op(1, 0, add(1, "w", 2))
    write_id = next(iter(node._writes))
    assert [m.message_type for m in out] == ["data.rep"]
    assert node.on_ack("b", write_id, "fenced", 0, 2, 2) == [], "the tick sends it again, in a while"
    again = node.on_ack("b", write_id, "fenced", 0, 2, 1)  # one sent by table 1 refused: it goes by table 2
    assert [(m.message_type, m.body[1].table_version) for m in again] == [("data.rep", 2)]


# -- any sequence of writes, lost messages and owners killed -------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

steps = st.lists(st.one_of(st.just(("write",)), st.tuples(st.just("lossy"), st.integers(0, 3)),
                           st.just(("kill",)), st.tuples(st.just("join"), st.integers(0, 3)),
                           st.just(("retry",))), max_size=30)


@settings(max_examples=80, deadline=None)
@given(steps)
def test_every_acknowledged_write_survives_any_sequence_of_losses_kills_and_joins(sequence):
    """Write n adds 4**n, so the counter's bits say exactly which writes applied, and how often (one
    applied twice sets an odd bit): every acknowledged one must be at whichever member owns the
    counter in the end, and none twice. A "retry" sends the unacknowledged writes again, as the
    proxy does, with their call ids, to the owner of the moment."""
    net = Net("m0", "m1", "m2")
    alive, version, joined = ["m0", "m1", "m2"], 1, 3
    net.start(table(version, tuple(alive)))
    acknowledged, number, issued = 0, 0, 0
    unanswered: dict[int, int] = {}  # write number -> token, not acknowledged yet

    def answered(token) -> bool:
        return token in net.replies and net.replies[token].error is None

    for step in sequence:
        owner = alive[0]
        if step[0] in ("write", "lossy"):
            delta = 4 ** number
            issued |= delta
            token = net.op(owner, 0, add(delta, f"w{number}", version))
            unanswered[number] = token
            number += 1
            # "lossy": every message to one backup is lost (it is cut off for this write)
            cut = alive[1 + step[1] % (len(alive) - 1)] if step[0] == "lossy" and len(alive) > 1 else None
            net.deliver(drop=lambda sender, message: message.to == cut)
        elif step[0] == "retry":
            for write, token in list(unanswered.items()):
                if not answered(token):
                    unanswered[write] = net.op(owner, 0, add(4 ** write, f"w{write}", version))
            net.deliver()
        elif step[0] == "kill" and len(alive) > 1:
            del net.nodes[alive.pop(0)]
            version += 1
            net.table(table(version, tuple(alive)))
            net.deliver()
        elif step[0] == "join" and len(alive) < 4:
            name = f"m{joined}"
            joined += 1
            net.nodes[name] = DataNode(name, PARTITIONS)
            alive.insert(step[1] % (len(alive) + 1), name)  # anywhere in the row: the owner too
            version += 1
            net.table(table(version, tuple(alive)))
            net.deliver()
        for write, token in list(unanswered.items()):
            if answered(token):
                acknowledged |= 4 ** write
                del unanswered[write]
    value = net.read(alive[0], 0, get(version))
    assert value & acknowledged == acknowledged, f"acknowledged writes {acknowledged:b} missing from {value:b}"
    assert value & ~issued == 0, f"a write applied twice: {value:b} (issued {issued:b})"
