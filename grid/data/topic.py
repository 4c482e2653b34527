"""Topic: publish and subscribe, over a ring of numbered messages in the partition of the topic's name.

::

    topic.publish(msg) --dumps(msg)--> Op(TOPIC, name, "publish", (data, capacity), call id) --> its number
    topic.subscribe(fn) --> a Subscription: its thread reads from where it got to:
        "read" (next, 100) --> (first, [data...], next'); fn(msg) for each, in order; then it waits
        on the owner for a change of the partition (a publish), as a blocked queue get does
        first > next: the ring dropped messages this subscriber had not read: on_loss(count), never silence

Each subscriber gets every message once, in the one order the owner numbered them (so each
publisher's in the order it published), on its own thread ("grid-topic"): ``fn`` is the
subscriber's code and runs nowhere else. The messages are backed up as any write: a failover
loses none that were acknowledged, and a subscriber reads on at the new owner from where it was.
A plain topic's subscriber starts at the next message; a reliable one's may start anywhere the
ring still holds (``start=``), and resume from its ``sequence`` after it was cancelled or its
process restarted.
"""

from __future__ import annotations

import logging
import pickle
import threading

from ..errors import GridError
from ..net import serialize
from .ring import TOPIC
from .single import InItsPartition

log = logging.getLogger("grid.data")

_BATCH = 100  # messages a subscriber reads at a time
_WAIT_SLICE = 1.0  # seconds a subscriber waits on the owner before it looks again (and at cancel)


class Topic(InItsPartition):
    """A distributed topic named ``name``; make one with ``cluster.get_topic(name, reliable=False)``.

    ``capacity``: the messages the ring keeps (the oldest go first); a subscriber that falls that
    far behind is told how many it lost.
    """

    KIND = TOPIC

    def __init__(self, name: str, backend, *, reliable: bool = False, capacity: int | None = None):
        if capacity is None:
            capacity = 10_000 if reliable else 1_000
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"a topic's capacity is an int of 1 or more, not {capacity!r}")
        super().__init__(name, backend)
        self.reliable = bool(reliable)
        self.capacity = capacity

    def publish(self, message) -> int:
        """Send ``message`` to every subscriber; its sequence number (once it is backed up)."""
        return self._write("publish", serialize.dumps(message), self.capacity)

    def subscribe(self, fn, *, start: int | None = None, on_loss=None) -> Subscription:
        """Call ``fn(message)`` for each message published from now on (a reliable topic: from
        sequence ``start`` too, if the ring still holds it), on a thread of its own.

        ``on_loss(count)`` is called when the ring dropped ``count`` messages this subscriber had
        not read yet (it fell behind by more than ``capacity``); by default that is logged as a
        warning. Returns the Subscription: ``cancel()`` it to stop.
        """
        if not callable(fn):
            raise TypeError(f"subscribe takes a callable, not {fn!r}")
        if start is not None and not self.reliable:
            raise ValueError("only a reliable topic's subscriber may start from a sequence "
                             "(get_topic(name, reliable=True))")
        subscription = Subscription(self, fn, self._read("tail") if start is None else int(start), on_loss)
        if self.on_subscribe is not None:
            self.on_subscribe(subscription)
        return subscription

    on_subscribe = None  # set by the cluster handle: it cancels its subscriptions when it closes

    def __repr__(self) -> str:
        return f"<Topic {self.name!r}{' reliable' if self.reliable else ''}>"


class Subscription:
    """One subscriber of a topic: ``sequence`` is the next message it will get; ``lost`` how many it missed."""

    def __init__(self, topic: Topic, fn, start: int, on_loss=None):
        self.topic = topic
        self.sequence = start
        self.lost = 0
        self._fn = fn
        self._on_loss = on_loss
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"grid-topic-{topic.name}", daemon=True)
        self._thread.start()

    def cancel(self, timeout: float = 10.0) -> None:
        """Stop delivering (a message being delivered finishes first)."""
        self._cancelled.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def active(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        topic = self.topic
        backend, partition = topic._backend, topic._partition
        seen = None
        while not self._cancelled.is_set():
            try:
                if seen is None:
                    seen = backend.wait_for_change(partition)  # (before the read: a publish after it wakes us)
                first, datas, following = topic._read("read", self.sequence, _BATCH)
                if first > self.sequence:
                    self._lose(first - self.sequence)
                for data in datas:
                    if self._cancelled.is_set():
                        return
                    self.sequence += 1
                    self._deliver(data)
                self.sequence = following
                if len(datas) < _BATCH:
                    seen = backend.wait_for_change(partition, seen, _WAIT_SLICE)
            except GridError as exc:  # the cluster handle closed, or no owner for a long while
                if self._cancelled.is_set() or "closed" in str(exc):
                    return
                log.warning("subscriber of topic %r: %s; reading on from message %d", topic.name, exc, self.sequence)
                seen = None

    def _deliver(self, data: bytes) -> None:
        try:
            message = pickle.loads(data)
        except Exception as exc:  # noqa: BLE001 - this subscriber's process cannot load it (a missing class?)
            log.warning("subscriber of topic %r: message %d cannot be unpickled here: %s", self.topic.name,
                        self.sequence - 1, exc)
            return
        try:
            self._fn(message)
        except Exception:  # noqa: BLE001 - the subscriber's own error: said, and the next message comes
            log.exception("subscriber of topic %r failed on message %d", self.topic.name, self.sequence - 1)

    def _lose(self, count: int) -> None:
        self.lost += count
        if self._on_loss is not None:
            try:
                self._on_loss(count)
            except Exception:  # noqa: BLE001
                log.exception("on_loss of topic %r's subscriber failed", self.topic.name)
        else:
            log.warning("subscriber of topic %r fell behind: lost %d messages (the ring keeps %d; give the "
                        "topic a larger capacity, or handle on_loss)", self.topic.name, count, self.topic.capacity)
