"""The structures' backend on a cluster: each op goes to its partition's owner, retried until one answers.

::

    DMap / DQueue / Counter --execute(partition, op)--> RemoteBackend
        owner = table.owner(partition); op.table_version = table.version
        owner is this member: DataService.submit          else: "data.op" over a link to the owner
        NotOwner (the table moved), the owner's link lost, no owner yet:
            wait for a newer table (or a moment), then ask again with the same op (same call id,
            so a write that was applied before its answer was lost applies once)
        after ``timeout`` seconds of that: DataUnavailable, naming the partition and the last reason

``wait_for_change`` asks the owner to answer once the partition's data changes ("data.wait"):
the blocked caller of a queue's ``get`` or ``put`` sleeps on the owner, not in a polling loop.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import Future

from ..cluster.members import local_target
from ..errors import ConnectionClosed, GridError, TransportError
from ..net import messaging
from ..net.lending import LinkReader
from .node import NotOwner
from .store import Op, StoreError, op_fields

_FIRST_PAUSE = 0.005  # seconds before a retry, doubling ...
_LONGEST_PAUSE = 0.1  # ... up to this
_WAIT_SLICE = 5.0  # a change wait asks again this often, so an owner that lost the partition is left


_LOOK = 0.1  # seconds between looks at the table while an answer is awaited


class _Moved(Exception):
    """The partition's owner changed while its answer was awaited."""


class DataUnavailable(GridError):
    """No owner of a partition answered in time (the cluster has no data member, or is failing over)."""


class RemoteBackend:
    """Routes the structures' ops to the owners of their partitions.

    Args:
        transport: makes the links to members.
        members: returns the current member list.
        table: returns the current partition table.
        local: this member's ``DataService`` (a member's own handle), or None (a client).
        timeout: seconds an op may keep retrying before DataUnavailable.
        default_partitions: the partition count before any table arrived.
    """

    def __init__(self, *, transport, members, table, local=None, timeout: float = 30.0,
                 default_partitions: int = 271, clock=time):
        self._transport = transport
        self._members = members
        self._table = table
        self._local = local
        self._timeout = timeout
        self._default_partitions = default_partitions
        self._clock = clock
        self._links: dict[str, Future] = {}
        self._open: dict[str, object] = {}  # uuid -> its open connection, the quick way to _links' result
        self._lock = threading.Lock()
        self._closed = False
        # The callers read their links themselves (net/lending.py): the owner's answer wakes the
        # thread that waits for it, not the transport's IO thread first.
        self._reader = LinkReader()
        self._waiting = 0  # threads in _await

    @property
    def partitions(self) -> int:
        table = self._table()
        return table.partitions if table.replicas else self._default_partitions

    def execute(self, partition: int, op: Op):
        """Run ``op`` on the owner of ``partition``; its result, or the store's error for it.

        Raises:
            DataUnavailable: no owner answered within the timeout.
            StoreError: the op itself was refused (bad arguments, a full queue's limit, ...).
        """
        return self._ask(partition, "data.op", lambda table: (partition, op_fields(op, table.version)),
                         lambda local, table: local.submit(partition, dataclasses.replace(
                             op, table_version=table.version)), None)

    def execute_many(self, items) -> list:
        """Run each ``(partition, op)``; their results in order. One "data.ops" message per owner,
        all sent before any answer is awaited; an op whose owner moved, or whose owner's link went,
        is asked again on its own (``execute``).

        Raises:
            StoreError: an op was refused (the first such error).
            DataUnavailable: an op found no owner that answered in time.
        """
        items = list(items)
        table = self._table()
        results: list = [None] * len(items)
        by_owner: dict[str, list[int]] = {}
        for index, (partition, _) in enumerate(items):
            owner = table.owner(partition) if table.replicas else None
            by_owner.setdefault(owner, []).append(index)
        asked = []
        for owner, indexes in by_owner.items():
            answer = None
            if owner is not None:
                try:
                    if self._local is not None and owner == self._local.me.uuid:
                        answer = self._local.submit_many([(items[i][0], dataclasses.replace(
                            items[i][1], table_version=table.version)) for i in indexes])
                    else:
                        answer = self._request(owner, "data.ops", [(items[i][0], op_fields(
                            items[i][1], table.version)) for i in indexes])
                except (GridError, OSError) as exc:
                    if isinstance(exc, GridError) and not _is_link_error(exc):
                        raise
                    self._forget(owner)
            asked.append((owner, indexes, answer))
        again = []
        for owner, indexes, answer in asked:
            outcomes = None
            if answer is not None:
                try:  # (a newer table ends the wait: a frozen owner never answers; each op goes again)
                    outcomes = self._await(answer, self._timeout, lambda: self._table().version > table.version)
                except _Moved:
                    pass
                except (GridError, OSError, TimeoutError) as exc:
                    if isinstance(exc, GridError) and not _is_link_error(exc):
                        raise
                    self._forget(owner)
            if outcomes is None:
                again += indexes
                continue
            for index, (ok, value) in zip(indexes, outcomes):
                if ok:
                    results[index] = value
                elif isinstance(value, NotOwner):
                    again.append(index)
                else:
                    raise value
        for index in again:  # (the op carries its call id: one applied before the link went applies once)
            results[index] = self.execute(*items[index])
        return results

    def wait_for_change(self, partition: int, seen=None, timeout: float | None = None):
        """The partition's change mark once it differs from ``seen`` (None: now), or after ``timeout``."""
        if seen is None:
            return self._ask(partition, "data.wait", lambda table: (partition, None, None),
                             lambda local, table: local.wait(partition, None, None), None)
        end = None if timeout is None else self._clock.monotonic() + timeout
        while True:
            remaining = None if end is None else max(0.0, end - self._clock.monotonic())
            piece = _WAIT_SLICE if remaining is None else min(remaining, _WAIT_SLICE)
            mark = self._ask(partition, "data.wait", lambda table: (partition, seen, piece),
                             lambda local, table: local.wait(partition, seen, piece), piece + self._timeout)
            if mark != seen or remaining is not None and remaining <= piece:
                return mark

    def states(self, timeout: float) -> dict:
        """``{uuid: state}`` of every member the table names (``DataService.state``), or
        ``{uuid: exception}`` for one that did not answer within ``timeout`` seconds."""
        return self.ask_all("data.state", None, lambda local: local.state(), timeout)

    def map_stats(self, name: str, timeout: float) -> dict:
        """``{uuid: stats}`` of map ``name`` on every member the table names (``DataService.map_stats``)."""
        return self.ask_all("data.stats", name, lambda local: local.map_stats(name), timeout)

    def ask_all(self, message_type: str, body, run_local, timeout: float) -> dict:
        """``{uuid: answer or exception}`` of every member the table names, asked at once."""
        table = self._table()
        asked = {}
        for uuid in sorted(table.members()):
            try:
                if self._local is not None and uuid == self._local.me.uuid:
                    asked[uuid] = run_local(self._local)
                else:
                    asked[uuid] = self._request(uuid, message_type, body)
            except Exception as exc:  # noqa: BLE001 - reported as that member's answer
                asked[uuid] = exc
        end = self._clock.monotonic() + timeout
        states = {}
        for uuid, answer in asked.items():
            if answer is None or isinstance(answer, Exception):
                states[uuid] = answer or DataUnavailable(f"member {uuid[:8]} is not in the member list")
                continue
            try:
                states[uuid] = self._await(answer, max(0.0, end - self._clock.monotonic()))
            except Exception as exc:  # noqa: BLE001
                states[uuid] = exc
        return states

    def close(self) -> None:
        self._reader.stop()
        with self._lock:
            self._closed = True
            links, self._links = self._links, {}
            self._open = {}
            if not self._waiting:
                self._reader.close()
        for future in links.values():
            if future.done() and future.exception() is None:
                future.result().close("the data proxy closed")

    # -- one request, retried --------------------------------------------------------------------------

    def _ask(self, partition: int, message_type: str, make_body, run_local, answer_timeout):
        deadline = self._clock.monotonic() + self._timeout
        pause, why = _FIRST_PAUSE, "no partition table yet"
        while True:
            if self._closed:
                raise GridError("the cluster handle is closed")
            table = self._table()
            owner = table.owner(partition) if table.replicas else None
            if owner is not None:
                try:
                    if self._local is not None and owner == self._local.me.uuid:
                        answer = run_local(self._local, table)
                    else:
                        answer = self._request(owner, message_type, make_body(table))
                    if answer is None:
                        why = f"owner {owner[:8]} is not in the member list"
                    else:
                        version = table.version
                        # A newer table naming another owner ends the wait (a frozen owner never
                        # answers): the op goes there, with its call id.
                        moved = lambda: (self._table().version > version  # noqa: E731
                                         and self._table().owner(partition) != owner)
                        return self._await(answer, answer_timeout if answer_timeout is not None else
                                           max(0.1, deadline - self._clock.monotonic()), moved)
                except NotOwner as exc:
                    why = str(exc)
                except _Moved:
                    why = f"owner {owner[:8]} no longer owns it"
                    continue
                except StoreError:
                    raise
                except (GridError, OSError, TimeoutError) as exc:  # the link to the owner went, or it is slow
                    if isinstance(exc, GridError) and not _is_link_error(exc):
                        raise
                    why = f"owner {owner[:8]}: {type(exc).__name__}: {exc}"
                    self._forget(owner)
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                raise DataUnavailable(f"partition {partition} of the data has no owner that answers after "
                                      f"{self._timeout:g} s ({why}); is a data member running?")
            self._pause(table.version, min(pause, remaining))
            pause = min(2 * pause, _LONGEST_PAUSE)

    def _await(self, answer, timeout: float, moved=None):
        """The answer's result (a ``messaging.Call``, or the local service's Future), reading the
        lent links on this thread meanwhile (at most ``timeout`` seconds).

        Raises:
            _Moved: ``moved()`` (looked at every _LOOK seconds) said to stop waiting.
            TimeoutError: no answer within ``timeout``.
        """
        if type(answer) is not messaging.Call:
            return self._await_future(answer, timeout, moved)
        if answer.ready:  # (a fellow caller read it, or the link failed as it was sent)
            return answer.result()
        reader = self._reader
        with self._lock:
            self._waiting += 1
        try:
            end = self._clock.monotonic() + timeout
            while not answer.ready:
                remaining = end - self._clock.monotonic()
                if remaining <= 0 or reader.stopping:
                    break
                # Alone, this thread reads everything; with others, one may take this one's answer
                # (and signal one of the waiters, maybe not this one): look again soon.
                alone = remaining if moved is None else min(remaining, _LOOK)
                reader.wait(alone if self._waiting == 1 else min(remaining, 0.002))
                if moved is not None and not answer.ready and moved():
                    answer.abandon()
                    raise _Moved()
        finally:
            with self._lock:
                self._waiting -= 1
                last = self._closed and not self._waiting
            if last:
                reader.close()
        if not answer.ready:
            answer.abandon()
            if reader.stopping:
                raise GridError("the cluster handle is closed")
            raise TimeoutError(f"no answer within {timeout:g} s")
        return answer.result()

    def _await_future(self, future: Future, timeout: float, moved=None):
        if future.done():
            return future.result()
        me = threading.get_ident()
        # Completed by another thread (the member's IO or data thread): wake a waiting thread,
        # which may be this one.
        future.add_done_callback(lambda done: threading.get_ident() != me and self._reader.signal())
        with self._lock:
            self._waiting += 1
        try:
            end = self._clock.monotonic() + timeout
            while not future.done() and not self._reader.stopping:
                remaining = end - self._clock.monotonic()
                if remaining <= 0:
                    break
                alone = remaining if moved is None else min(remaining, _LOOK)
                self._reader.wait(alone if self._waiting == 1 else min(remaining, 0.002))
                if moved is not None and not future.done() and moved():
                    raise _Moved()
            if not future.done():
                return future.result(max(0.0, end - self._clock.monotonic()))
            return future.result()
        finally:
            with self._lock:
                self._waiting -= 1
                last = self._closed and not self._waiting
            if last:
                self._reader.close()

    def _pause(self, version: int, seconds: float) -> None:
        """Wait ``seconds``, or less once a newer table arrived (it may name another owner)."""
        end = self._clock.monotonic() + seconds
        step = min(seconds, _FIRST_PAUSE)
        while self._table().version <= version and self._clock.monotonic() < end:
            threading.Event().wait(step)

    def _request(self, uuid: str, message_type: str, body) -> messaging.Call | None:
        conn = self._open.get(uuid)
        if conn is None or not conn.is_open:
            link = self._link(uuid)
            if link is None:
                return None
            conn = link.result(self._timeout)
        return messaging.call(conn, message_type, body, self._reader.signal)

    def _link(self, uuid: str) -> Future | None:
        with self._lock:
            future = self._links.get(uuid)
            if future is not None and (not future.done() or (future.exception() is None and future.result().is_open)):
                return future
            member = next((m for m in self._members() if m.uuid == uuid), None)
            if member is None:
                return None
            future = self._links[uuid] = self._transport.connect(local_target(member))
        future.add_done_callback(lambda connected: self._opened(uuid, connected))
        return future

    def _opened(self, uuid: str, connected: Future) -> None:
        if connected.exception() is None:
            conn = connected.result()
            with self._lock:
                if self._links.get(uuid) is connected:
                    self._open[uuid] = conn
            self._reader.lend(conn)  # (not a TLS link: then the IO thread reads it)

    def _forget(self, uuid: str) -> None:
        with self._lock:
            future = self._links.get(uuid)
            if future is not None and future.done() and (future.exception() is not None or
                                                         not future.result().is_open):
                del self._links[uuid]
                self._open.pop(uuid, None)


def _is_link_error(exc: GridError) -> bool:
    """Whether ``exc`` says the link failed (worth a retry elsewhere), not that the op did."""
    return isinstance(exc, (ConnectionClosed, TransportError))
