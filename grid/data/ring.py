"""The topic kind of the store: a bounded ring of published messages, numbered, as data without IO.

::

    Topic.publish(msg) --Op(TOPIC, name, "publish", (data, capacity))--> its sequence number
        effect ("topic_publish", data, capacity): appended; the oldest dropped past capacity
    a subscriber --Op(TOPIC, name, "read", (start, max_items))--> (first, [data...], next)
        first: the oldest sequence the ring still holds (above ``start``: messages were lost)

A topic lives wholly in the partition of its name, so its messages are backed up as any write and
survive a failover; every subscriber reads them in one order (the order the owner numbered them, so
each publisher's in the order it published), each once, from the sequence it got to.
"""

from __future__ import annotations

TOPIC = "topic"

READS = {TOPIC: {"read", "tail"}}
WRITES = {TOPIC: {"publish", "destroy"}}


class Refused(Exception):
    def __init__(self, error: str, message: str):
        super().__init__(message)
        self.error = error


def _ring(value) -> dict:
    return value if value is not None else {"first": 0, "items": []}


def size(kind: str, value) -> int:
    return len(value["items"])


def copy(kind: str, value):
    return {"first": value["first"], "items": list(value["items"])}


def read(kind: str, value, action: str, args: tuple, now: float = 0.0):
    ring = _ring(value)
    end = ring["first"] + len(ring["items"])
    if action == "tail":
        return end  # (the sequence the next message will get)
    start, max_items = args
    if start > end:  # (the topic was destroyed and began again: its new messages are all new)
        start = 0
    begin = max(start, ring["first"])
    items = ring["items"][begin - ring["first"]:begin - ring["first"] + max_items]
    return ring["first"], items, begin + len(items)


def write(kind: str, name: str, value, action: str, args: tuple, stamp: tuple, now: float = 0.0) -> tuple:
    ring = _ring(value)
    if action == "destroy":
        return value is not None, ([(TOPIC, name, "clear", ())] if value is not None else [])
    data, capacity = args
    if type(capacity) is not int or capacity < 1:
        raise Refused("ValueError", f"a topic's capacity is an int of 1 or more, not {capacity!r}")
    return ring["first"] + len(ring["items"]), [(TOPIC, name, "topic_publish", (data, capacity))]


def effect_topic_publish(structures: dict, name: str, data: bytes, capacity: int) -> None:
    ring = structures.setdefault((TOPIC, name), {"first": 0, "items": []})
    ring["items"].append(data)
    extra = len(ring["items"]) - capacity
    if extra > 0:
        del ring["items"][:extra]
        ring["first"] += extra
