"""A member's data service: its ``DataNode`` behind one lock, the node's messages over member links.

::

    proxy --"data.op" (partition, op fields)-> IO thread, under the lock: node.on_op(token=Answer, ...)
                                               --> outputs (a read is answered before the handler returns)
    proxy --"data.ops" [(partition, fields)]-> the same for each; answered once all are
    proxy --"data.wait" (partition, seen, s)-> parked here until the partition's data changes
    member <-> member: "data.rep" "data.ack" "data.snap" "data.snapped" "data.want" "data.none"
                       or several of them in order in one "data.batch" [(type, body), ...]
                                               the sender is the link's authenticated uuid
    outputs: Send(to, type, body) --> the link to member ``to`` (made on first use; in order;
                                      one call's several Sends to a member go as one batch)
             Reply(token, result, error) --> the op's Future or Answer: the proxy is answered
    the "grid-data" thread: every _TICK seconds, the table from membership, resends (node.tick),
                          expired waits, messages held for members not listed yet

Every call into the node holds the service's lock: the IO thread runs proxies' ops and the
members' messages at once (no hand-off to another thread per op), and the data thread the
periodic work. The node runs no user code and unpickles nothing. Nothing
here unpickles a value or runs user code: keys and values stay bytes. A data wait is answered
with the partition's change mark ``(member uuid, count)``: after a failover the new owner's mark
differs from any the old owner gave, so a waiter never sleeps through a change it cannot see.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future

from ..cluster.members import local_target
from ..cluster.partitions import width
from ..errors import GridError
from ..net import messaging
from .events import MemberListeners
from .node import DataNode, Reply, Send
from .remote import RemoteBackend
from .store import COUNTER, LIST, MAP, MULTIMAP, QUEUE, SET, CallIds, Op, Record, SplitBrainProtection, is_write, op_from_fields

log = logging.getLogger("grid.data")

_TICK = 0.05  # seconds between looks at the table (and expired waits) when nothing else happens
_SETTLE = 0.2  # seconds between the master's looks at partitions whose rows still carry old replicas
_MEMBER_MESSAGES = ("data.rep", "data.ack", "data.snap", "data.snapped", "data.want", "data.none")


class _Batch:
    """The outcomes of a ``submit_many``: ``done`` (a Future or an Answer) gets them once all are in."""

    __slots__ = ("outcomes", "left", "done")

    def __init__(self, count: int, done):
        self.outcomes: list = [None] * count
        self.left = count
        self.done = done

    def settle(self, index: int, outcome: tuple) -> None:  # (under the service's lock, as every reply)
        self.outcomes[index] = outcome
        self.left -= 1
        if not self.left:
            self.done.set_result(self.outcomes)


class _Slot:
    """One op's token in a batch: what the node replies to (lighter than a Future each)."""

    __slots__ = ("_batch", "_index", "_done")

    def __init__(self, batch: _Batch, index: int):
        self._batch, self._index, self._done = batch, index, False

    def done(self) -> bool:
        return self._done

    def set_running_or_notify_cancel(self) -> bool:
        return True

    def set_result(self, value) -> None:
        if not self._done:
            self._done = True
            self._batch.settle(self._index, (True, value))

    def set_exception(self, error: BaseException) -> None:
        if not self._done:
            self._done = True
            self._batch.settle(self._index, (False, error))


class DataService:
    """The partitions member ``membership.me`` holds, served to proxies and replicated to its peers."""

    def __init__(self, *, router, transport, membership, split_brain_protection: int = 0,
                 merge_policy: str = "put_if_absent", clock=time):
        self.me = membership.me
        self._quorum = split_brain_protection
        self._transport = transport
        self._membership = membership
        self._clock = clock
        table = membership.partitions()
        self._merge_policy = merge_policy
        self.node = DataNode(self.me.uuid, table.partitions, table.backup_count,
                             keep_times=merge_policy == "latest_update")
        self._to_merge: list = []  # replicas this member owned on its side of a split, merged once it joined
        self._settling, self._settled_at = False, 0.0  # the master's looks at migrations (_settle)
        self._merger = None
        self._epoch = getattr(membership, "epoch", 0)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.RLock()  # every call into the node, and the links' state
        self._links: dict[str, Future] = {}  # member uuid -> Future of the connection (data thread only)
        self._outbox: dict[str, list] = {}  # member uuid -> messages waiting for its connection
        self._outbox_lock = threading.Lock()
        self._held: dict[str, list] = {}  # uuid -> messages for a member the table names, not yet listed
        self._changes: dict[int, int] = {}  # partition -> writes that changed its data here
        self._waits: list = []  # (partition, seen mark, Future, deadline or None), parked
        self.listeners = MemberListeners()  # the links listening to maps' changes
        self._counts: dict[str, list] = {}  # map name -> [operations, hits (gets that found the entry)] here
        self.op_counts: dict[str, int] = {}  # structure kind -> ops run here as owner (metrics)
        self.op_by_structure: dict[tuple, int] = {}  # (kind, name) -> ops run here as owner (metrics)
        self.snapshots = [0, 0]  # partition snapshots sent, received (migrations and restores; metrics)
        router.register("data.op", self._on_op)
        router.register("data.ops", self._on_ops)
        router.register("data.wait", self._on_wait)
        router.register("data.state", lambda conn, body: self.state())
        router.register("data.stats", self._on_stats)
        router.register("data.listen", self._on_listen)
        router.register("data.unlisten", self._on_unlisten)
        for message_type in (*_MEMBER_MESSAGES, "data.batch"):
            router.register(message_type, self._member_message(message_type))
        self._thread = threading.Thread(target=self._run, name="grid-data", daemon=True)
        self._thread.start()

    # -- entry points (any thread) ---------------------------------------------------------------

    def submit(self, partition: int, op: Op) -> Future:
        """Run ``op`` here (a proxy's, or this member's own handle's); the Future gives its result."""
        result: Future = Future()
        with self._lock:
            self._follow_table()
            self._op(result, partition, op)
        return result

    def submit_many(self, items, answer=None) -> Future:
        """Run each ``(partition, op)``; the Future (or ``answer``, a ``messaging.Answer``) gives
        ``[(True, result) | (False, error)]`` in order."""
        combined = Future() if answer is None else answer
        items = list(items)
        if not items:
            combined.set_result([])
            return combined
        batch = _Batch(len(items), combined)
        with self._lock:
            self._follow_table()
            out: list = []  # (emitted together: one message per backup for all of them)
            for index, (partition, op) in enumerate(items):
                self._op(_Slot(batch, index), partition, op, out)
            self._emit(out)
        return combined

    def wait(self, partition: int, seen, timeout: float | None) -> Future:
        """The partition's change mark, once it is not ``seen`` (at once for None) or ``timeout`` passed."""
        result: Future = Future()
        with self._lock:
            self._wait(result, partition, seen, timeout)
        return result

    def state(self) -> Future:
        """What this member holds, for ``is_safe``: its table version, each replica's seq, the
        partitions it owns and waits to receive, the backups it is sending snapshots to, and the
        writes waiting for their backups."""
        result: Future = Future()

        def job():
            node = self.node
            if result.set_running_or_notify_cancel():
                result.set_result({"table": node.table.version,
                                   "held": {p: replica.seq for p, replica in node.replicas.items()},
                                   "wanting": sorted(node.wanting), "syncing": node.syncing_count,
                                   "syncing_partitions": node.syncing_partitions,
                                   "pending": node.pending_writes, "sizes": self._sizes()})

        with self._lock:
            job()
        return result

    def summary(self) -> dict:
        """For ``status``: the partitions this member owns and backs up, and the structures in the
        ones it owns, ``{name: {"kind", "size"}}`` (their share here)."""
        with self._lock:
            node, me = self.node, self.me.uuid
            table = node.table
            owned = set(table.owned_by(me)) if table.replicas else set()
            backups = sum(1 for p in range(table.partitions) if table.replicas and me in table.backups(p))
            structures: dict = {}
            for partition, replica in node.replicas.items():
                if partition in owned:
                    for kind, name, size in replica.structures():
                        entry = structures.setdefault(name, {"kind": kind, "size": 0})
                        entry["size"] += size
        return {"owned": len(owned), "backups": backups, "structures": structures}

    def _sizes(self) -> dict:
        """``{map name: entries}`` held here, as owner and as backup (expired ones until swept)."""
        sizes: dict = {}
        for replica in self.node.replicas.values():
            for kind, name, size in replica.structures():
                if kind == "map":
                    sizes[name] = sizes.get(name, 0) + size
        return sizes

    def close(self) -> None:
        self._jobs.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        for future in list(self._links.values()):
            if future.done() and future.exception() is None:
                future.result().close("the data service stopped")

    # -- handlers (IO thread): queue a job ---------------------------------------------------------------

    def _on_op(self, conn, body) -> messaging.Answer:
        op = None
        if type(body) is tuple and len(body) == 2 and type(body[0]) is int:
            partition, op = body[0], op_from_fields(body[1])
        if op is None:
            raise GridError(f"a 'data.op' body is (partition, op fields), not {messaging.shorten(body)}")
        answer = messaging.Answer()  # (no Future: answered by the IO thread or an ack, see messaging.Answer)
        with self._lock:
            self._follow_table()
            self._op(answer, partition, op)
        return answer

    def _on_ops(self, conn, body) -> messaging.Answer:
        items = []
        for item in body if type(body) is list else ():
            op = None
            if type(item) is tuple and len(item) == 2 and type(item[0]) is int:
                op = op_from_fields(item[1])
            if op is None:
                break
            items.append((item[0], op))
        if type(body) is not list or len(items) != len(body):
            raise GridError(f"a 'data.ops' body is [(partition, op fields)], not {messaging.shorten(body)}")
        return self.submit_many(items, messaging.Answer())

    def _on_wait(self, conn, body) -> Future:
        partition, seen, timeout = body
        if type(partition) is not int or (timeout is not None and not isinstance(timeout, (int, float))):
            raise GridError(f"a 'data.wait' body is (partition, seen, timeout), not {messaging.shorten(body)}")
        return self.wait(partition, seen, timeout)

    def _on_stats(self, conn, body) -> Future:
        if type(body) is not str:
            raise GridError(f"a 'data.stats' body is a map's name, not {messaging.shorten(body)}")
        return self.map_stats(body)

    def map_stats(self, name: str) -> Future:
        """Map ``name`` here: entries and bytes (keys and values) it owns, entries it backs up, and
        the operations and hits (gets that found their entry) this member answered."""
        result: Future = Future()
        with self._lock:
            owned = backed = size = 0
            for partition, replica in self.node.replicas.items():
                entries = replica.map_entries(name)
                if not entries:
                    continue
                if self.node.table.owner(partition) == self.me.uuid:
                    owned += len(entries)
                    size += sum(len(key) + len(value) for key, value in entries.items())
                else:
                    backed += len(entries)
            operations, hits = self._counts.get(name, (0, 0))
        result.set_result({"entries": owned, "backup_entries": backed, "bytes": size, "operations": operations,
                           "hits": hits})
        return result

    def _on_listen(self, conn, body) -> bool:
        listener_id, name, key, include_value = body
        if type(listener_id) is not str or type(name) is not str or (key is not None and type(key) is not bytes):
            raise GridError(f"a 'data.listen' body is (id, map name, key bytes or None, include value), "
                            f"not {messaging.shorten(body)}")
        with self._lock:
            return self.listeners.listen(conn, listener_id, name, key, bool(include_value))

    def _on_unlisten(self, conn, body) -> bool:
        if type(body) is not str:
            raise GridError(f"a 'data.unlisten' body is a listener id, not {messaging.shorten(body)}")
        with self._lock:
            return self.listeners.unlisten(conn, body)

    def _member_message(self, message_type: str):
        def handler(conn, body) -> None:
            sender = conn.peer_info.get("uuid")
            if conn.peer_info.get("role") != "member" or not isinstance(sender, str):
                raise GridError(f"{message_type!r} comes from members only, not from {conn!r}")
            with self._lock:
                self._follow_table()
                if message_type != "data.batch":
                    self._emit(self._from_member(message_type, sender, body))
                    return
                if type(body) is not list or not all(type(item) is tuple and len(item) == 2
                                                     and item[0] in _MEMBER_MESSAGES for item in body):
                    raise GridError(f"a 'data.batch' body is [(member message type, body)], not "
                                    f"{messaging.shorten(body)}")
                out: list = []
                failed = None
                for inner_type, inner_body in body:
                    try:
                        out += self._from_member(inner_type, sender, inner_body)
                    except Exception as exc:  # noqa: BLE001 - the rest still counts; the Router logs it
                        failed = failed or exc
                self._emit(out)
                if failed is not None:
                    raise failed
        return handler

    # -- the data thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=_TICK)
            except queue.Empty:
                job = ()
            if job is None:
                return
            try:
                with self._lock:
                    self._follow_table()
                    if job:
                        fn, args = job
                        fn(*args)
                    self._emit(self.node.tick(self._clock.monotonic()))
                    self._settle()
                    if self._held:
                        self._release_held()
                    self._expire_waits()
            except Exception:  # a grid bug: the service goes on with the next job
                log.exception("the data service failed a job")

    def _follow_table(self) -> None:
        while True:  # a table and the epoch it belongs to (Membership._rejoin empties the table, then moves the epoch)
            epoch = getattr(self._membership, "epoch", 0)
            table = self._membership.partitions()
            if getattr(self._membership, "epoch", 0) == epoch:
                break
        if epoch != self._epoch:
            self._epoch = epoch
            self._drop_everything()
        if table.version > self.node.table.version:
            self._emit(self.node.take_table(table))
            self._wake_moved()
            if self._to_merge and table.replicas and self._merger is None:
                replicas, self._to_merge = self._to_merge, []
                self._merger = threading.Thread(target=self._merge, args=(replicas,), name="grid-merge", daemon=True)
                self._merger.start()

    def _settle(self) -> None:
        """The master, every _SETTLE seconds while rows carry old replicas (a migration): ask each
        such partition's owner for its state, and trim the rows whose owner holds the partition
        with every backup restored (membership publishes the trimmed table)."""
        table = self.node.table
        now = self._clock.monotonic()
        if self._settling and now - self._settled_at > 10 * _SETTLE:
            self._settling = False  # an owner that never answered: ask again
        if (self._settling or now - self._settled_at < _SETTLE or not table.replicas
                or not getattr(self._membership, "is_master", False)):
            return
        self._settled_at = now
        data = sum(1 for m in self._membership.members() if m.data)
        keep = width(table, data)
        wide = [partition for partition, row in enumerate(table.replicas) if len(row) > keep]
        if not wide:
            return
        owners = {table.replicas[partition][0] for partition in wide}
        answers: dict = {}
        for uuid in owners:
            if uuid == self.me.uuid:
                answers[uuid] = self.state()
                continue
            link = self._link(uuid)
            if link is None or not link.done() or link.exception() is not None:
                continue  # (asked at the next look, once linked)
            try:
                answers[uuid] = messaging.request(link.result(), "data.state", None)
            except GridError:
                continue
        if not answers:
            return
        self._settling = True
        left = [len(answers)]

        def answered(_):
            with self._lock:
                left[0] -= 1
                if left[0]:
                    return
                self._settling = False
                ready = []
                for partition in wide:
                    answer = answers.get(table.replicas[partition][0])
                    if answer is None or answer.exception() is not None:
                        continue
                    state = answer.result()
                    if (isinstance(state, dict) and state.get("table") == table.version
                            and partition not in state.get("wanting", ()) and partition in state.get("held", {})
                            and partition not in state.get("syncing_partitions", ())):
                        ready.append(partition)
            if ready:
                self._membership.trim_partitions(table.version, ready)

        for answer in answers.values():
            answer.add_done_callback(answered)

    def _drop_everything(self) -> None:
        """This member left the member list and joins again: the cluster went on without it, so
        what it holds is stale (owning a partition again, it would hand out and snapshot old data)."""
        old = self.node
        if getattr(self._membership, "merging", False):
            # Its side of a split merges into the other: what it owned there (written on this side,
            # maybe only here) goes into the cluster it joins, by merge_policy.
            self._to_merge += [replica for partition, replica in old.replicas.items()
                               if old.table.owner(partition) == self.me.uuid]
            log.warning("this member's side of a split merges into another cluster: the %d partitions it owned "
                        "merge into it (merge_policy = %s)", len(self._to_merge), self._merge_policy)
        else:
            log.warning("this member rejoins the cluster: dropping the %d partition replicas it held "
                        "(the cluster kept their data)", len(old.replicas))
        self.node = DataNode(self.me.uuid, old.table.partitions, old.table.backup_count, keep_times=old.keep_times)
        self._emit(old.abandon())
        self._wake_moved()

    def _merge(self, replicas) -> None:
        """The data of this member's side of a healed split, into the cluster it joined (thread
        "grid-merge"): each entry, queue, list, set and counter as a "merge" write at its owner, by merge_policy."""
        backend = RemoteBackend(transport=self._transport, members=self._membership.members,
                                table=self._membership.partitions, local=self, timeout=60.0)
        calls, merged, items = CallIds(), 0, []
        try:
            for replica in replicas:
                for kind, name, value in replica.snapshot()["structures"]:
                    if kind == MAP:
                        items += [(replica.partition, Op(MAP, name, "merge", (key, data, replica.written_at(name, key),
                                                                               self._merge_policy), calls.next()))
                                  for key, data in value.items()]
                    elif kind == QUEUE:
                        items.append((replica.partition, Op(QUEUE, name, "merge", (tuple(value["items"]),), calls.next())))
                    elif kind == LIST:  # (as a queue: taken whole, if the other side has no such list)
                        items.append((replica.partition, Op(LIST, name, "merge", (tuple(value["items"]),), calls.next())))
                    elif kind == SET:  # (member by member: the ones the other side lacks)
                        items.append((replica.partition, Op(SET, name, "merge", (tuple(value),), calls.next())))
                    elif kind == MULTIMAP:  # (key by key: the values of a key the other side lacks)
                        items += [(replica.partition, Op(MULTIMAP, name, "merge", (key, tuple(values)), calls.next()))
                                  for key, values in value.items()]
                    elif kind == COUNTER:
                        items.append((replica.partition, Op(COUNTER, name, "merge", (value,), calls.next())))
                    # (a lock's or semaphore's holds and a topic's messages stay with the larger side:
                    # the smaller side's holders hold nothing there, and its subscribers read on there)
            for start in range(0, len(items), 500):
                merged += sum(1 for took in backend.execute_many(items[start:start + 500]) if took)
            log.warning("merged the smaller side's data: %d of %d entries, queues and counters taken "
                        "(merge_policy = %s)", merged, len(items), self._merge_policy)
        except Exception:  # noqa: BLE001 - said, with what was lost
            log.exception("merging the smaller side's data failed after %d of %d", merged, len(items))
        finally:
            backend.close()
            with self._lock:
                self._merger = None

    def _op(self, result: Future, partition: int, op: Op, emit: list | None = None) -> None:
        """Run ``op`` for ``result`` (a Future or an Answer); its outputs emitted, or added to ``emit``."""
        if not result.set_running_or_notify_cancel():
            return
        if not 0 <= partition < self.node.table.partitions:
            result.set_exception(GridError(f"partition {partition} is out of range (the table has "
                                           f"{self.node.table.partitions})"))
            return
        if self._quorum and is_write(op) and len(self._membership.members()) < self._quorum:
            members = len(self._membership.members())
            result.set_exception(SplitBrainProtection(
                f"the write to {op.kind} {op.name!r} is refused: this side of the cluster has {members} "
                f"member{'s' if members != 1 else ''}, and split_brain_protection asks for at least "
                f"{self._quorum} (a network split, or members down; it goes on once they are back)"))
            return
        out = self.node.on_op(result, partition, op)
        self.op_counts[op.kind] = self.op_counts.get(op.kind, 0) + 1
        key = (op.kind, op.name)
        self.op_by_structure[key] = self.op_by_structure.get(key, 0) + 1
        if emit is not None:
            emit += out
        if op.kind == "map":
            counts = self._counts.get(op.name)
            if counts is None:
                counts = self._counts[op.name] = [0, 0]
            counts[0] += 1
            if op.action == "get" and out and type(out[0]) is Reply and out[0].result is not None:
                counts[1] += 1
        if emit is None:
            self._emit(out)

    def _from_member(self, message_type: str, sender: str, body) -> list:
        node = self.node
        if message_type == "data.rep":
            write_id, record = body
            if not isinstance(record, Record):
                raise GridError(f"a 'data.rep' record is a Record, not {messaging.shorten(record)}")
            out = node.on_replicate(sender, write_id, record)
        elif message_type == "data.ack":
            write_id, answer, partition, *version = body  # ("fenced" also says the table the backup follows)
            out = node.on_ack(sender, write_id, answer, partition, *version[:2])
        elif message_type == "data.snap":
            partition, snapshot = body
            self.snapshots[1] += 1
            out = node.on_snapshot(sender, partition, snapshot)
        elif message_type == "data.snapped":
            partition, seq = body
            out = node.on_snapshot_applied(sender, partition, seq)
        elif message_type == "data.want":
            partition, table_version = body
            out = node.on_want(sender, partition, table_version)
        else:  # "data.none"
            partition, table_version = body
            out = node.on_none(sender, partition, table_version)
        return out

    def _emit(self, outputs) -> None:
        """Replies, then each member's messages: in their order, in one "data.batch" when several
        (a put_all's records to a backup, and its acks back, travel as one message each way)."""
        sends = None
        for output in outputs:
            if type(output) is Send:
                if output.message_type == "data.snap":
                    self.snapshots[0] += 1
                if sends is None:
                    sends = {}
                sends.setdefault(output.to, []).append((output.message_type, output.body))
            elif type(output) is Reply:
                self._reply(output)
        if sends is not None:
            for uuid, messages in sends.items():
                if len(messages) == 1:
                    self._send(uuid, *messages[0])
                else:
                    self._send(uuid, "data.batch", messages)

    def _reply(self, reply: Reply) -> None:
        if reply.effects:
            self.listeners.written(reply.effects)
        if reply.changed:
            self._changes[reply.partition] = self._changes.get(reply.partition, 0) + 1
            self._wake(reply.partition)
        token = reply.token
        if token is None or token.done():  # (None: the node's own write, an expiry or an eviction)
            return
        if reply.error is not None:
            token.set_exception(reply.error)
        else:
            token.set_result(reply.result)

    # -- waits for a change --------------------------------------------------------------------------

    def _mark(self, partition: int) -> tuple:
        return (self.me.uuid, self._changes.get(partition, 0))

    def _wait(self, result: Future, partition: int, seen, timeout) -> None:
        if not result.set_running_or_notify_cancel():
            return
        mark = self._mark(partition)
        if seen is None or tuple(seen) != mark or self.node.table.owner(partition) != self.me.uuid:
            result.set_result(mark)
            return
        deadline = None if timeout is None else self._clock.monotonic() + max(0.0, timeout)
        self._waits.append((partition, mark, result, deadline))

    def _wake(self, partition: int) -> None:
        still = []
        for wait in self._waits:
            if wait[0] == partition:
                wait[2].set_result(self._mark(partition))
            else:
                still.append(wait)
        self._waits = still

    def _wake_moved(self) -> None:
        """The table changed: waits on partitions this member no longer owns end (they ask the new owner)."""
        for partition in {wait[0] for wait in self._waits if self.node.table.owner(wait[0]) != self.me.uuid}:
            self._wake(partition)

    def _expire_waits(self) -> None:
        if not self._waits:
            return
        now = self._clock.monotonic()
        still = []
        for partition, mark, result, deadline in self._waits:
            if deadline is not None and now >= deadline:
                result.set_result(mark)
            else:
                still.append((partition, mark, result, deadline))
        self._waits = still

    # -- links to the other members (data thread) ------------------------------------------------------

    def _send(self, uuid: str, message_type: str, body) -> None:
        """Send to member ``uuid`` in order: queued behind its connection while that is being made,
        and held while the table names a member the member list does not have yet (a member takes
        the table a moment before the list that comes with it)."""
        held = self._held.get(uuid)
        if held is not None:
            held.append((message_type, body))
            return
        future = self._link(uuid)
        if future is None:
            if uuid in self.node.table.members():
                self._held[uuid] = [(message_type, body)]
            else:
                log.debug("no link to %s (not a member now): %s dropped", uuid[:8], message_type)
            return
        with self._outbox_lock:
            waiting = self._outbox.get(uuid)
            if waiting is not None:
                waiting.append((message_type, body))
                return
        try:
            messaging.send(future.result(), message_type, body)
        except GridError as exc:  # the link closed: what it carried is asked for again (a "want")
            log.debug("sending %s to %s failed: %s", message_type, uuid[:8], exc)
            self._links.pop(uuid, None)

    def _release_held(self) -> None:
        named = self.node.table.members()
        for uuid in list(self._held):
            if uuid not in named:  # it left the table before it was listed: nothing to send it
                del self._held[uuid]
            elif self._link(uuid) is not None:
                for message_type, body in self._held.pop(uuid):
                    self._send(uuid, message_type, body)

    def _link(self, uuid: str) -> Future | None:
        future = self._links.get(uuid)
        if future is not None and (not future.done() or (future.exception() is None and future.result().is_open)):
            return future
        member = next((m for m in self._membership.members() if m.uuid == uuid), None)
        if member is None:
            return None
        with self._outbox_lock:
            self._outbox[uuid] = []
        future = self._links[uuid] = self._transport.connect(local_target(member))
        future.add_done_callback(lambda done: self._connected_locked(uuid, done))
        return future

    def _connected_locked(self, uuid: str, future: Future) -> None:
        with self._lock:
            self._connected(uuid, future)

    def _connected(self, uuid: str, future: Future) -> None:
        with self._outbox_lock:
            waiting = self._outbox.pop(uuid, [])
        if future.exception() is not None:
            log.info("cannot reach member %s for data: %s", uuid[:8], future.exception())
            if self._links.get(uuid) is future:
                del self._links[uuid]
            return
        conn = future.result()
        for message_type, body in waiting:
            try:
                messaging.send(conn, message_type, body)
            except GridError as exc:
                log.debug("sending %s to %s failed: %s", message_type, uuid[:8], exc)
                return
