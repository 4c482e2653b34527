"""Entry listeners and the near cache: the owners tell listening clients what changed, in order."""

from __future__ import annotations

import threading

import pytest

import grid
from grid.data.dmap import DMap
from grid.data.store import LocalBackend

from .conftest import wait_for

WAIT = 30


class Recorder:
    def __init__(self):
        self.events = []
        self._lock = threading.Lock()

    def __call__(self, event) -> None:
        with self._lock:
            self.events.append(event)

    def seen(self, kind=None) -> list:
        with self._lock:
            return [(e.kind, e.key, e.value) for e in self.events if kind is None or e.kind == kind]


def test_listeners_see_each_change_in_order_filtered_by_key_or_predicate(local_cluster):
    cluster = local_cluster(2)
    watcher, writer = cluster.connect(), cluster.connect()
    try:
        watched = watcher.get_map("stock")
        everything, one_key, big, no_values = Recorder(), Recorder(), Recorder(), Recorder()
        watched.add_entry_listener(everything)
        watched.add_entry_listener(one_key, key="apples")
        watched.add_entry_listener(big, predicate=lambda key, value: value is not None and value > 10)
        quiet = watched.add_entry_listener(no_values, include_value=False)

        stock = writer.get_map("stock")
        stock["apples"] = 5
        stock["apples"] = 50
        stock["pears"] = 20
        del stock["apples"]
        stock.put_all({n: n for n in range(30)})
        wait_for(lambda: len(everything.seen()) == 34, WAIT)
        assert everything.seen()[:4] == [("added", "apples", 5), ("updated", "apples", 50), ("added", "pears", 20),
                                         ("removed", "apples", None)]
        assert sorted(key for _, key, _ in everything.seen()[4:]) == list(range(30))
        assert one_key.seen() == [("added", "apples", 5), ("updated", "apples", 50), ("removed", "apples", None)]
        wait_for(lambda: len(big.seen()) == 21, WAIT)
        assert {key for _, key, _ in big.seen()} == {"apples", "pears", *range(11, 30)}
        assert all(value is None for _, _, value in no_values.seen())

        assert watched.remove_entry_listener(quiet) and not watched.remove_entry_listener(quiet)
        before = len(no_values.seen())
        stock["plums"] = 1
        wait_for(lambda: ("added", "plums", 1) in everything.seen(), WAIT)
        assert len(no_values.seen()) == before, "a removed listener hears nothing more"
        with pytest.raises(TypeError, match="fn\\(event\\)"):
            watched.add_entry_listener("print")
    finally:
        watcher.close()
        writer.close()


def test_expiry_and_eviction_are_events_too(local_cluster):
    cluster = local_cluster(2)
    client = cluster.connect()
    try:
        heard = Recorder()
        client.get_map("short", ttl=0.3).add_entry_listener(heard)
        client.get_map("short", ttl=0.3)["k"] = 1
        wait_for(lambda: ("expired", "k", None) in heard.seen(), WAIT)
        small = client.get_map("small", max_size=1)
        small.add_entry_listener(heard)
        for key in range(600):  # at least one owner goes past its share of one
            small[key] = key
        wait_for(lambda: heard.seen("evicted"), WAIT)
    finally:
        client.close()


def test_a_member_that_joins_later_tells_the_listeners_too(local_cluster):
    cluster = local_cluster(1)
    client = cluster.connect()
    try:
        heard = Recorder()
        data = client.get_map("grow")
        data.add_entry_listener(heard)
        joiner = cluster.add()
        wait_for(lambda: joiner.uuid in client.partitions().members(), WAIT)
        table = client.partitions()
        key = next(k for k in range(10_000) if table.owner(client.partition_of(k)) == joiner.uuid)

        def written_and_heard():
            data[key] = "v"
            return ("added", key, "v") in heard.seen() or ("updated", key, "v") in heard.seen()

        wait_for(written_and_heard, WAIT)
    finally:
        client.close()


def test_a_near_cache_reads_locally_and_is_told_of_changes(local_cluster):
    cluster = local_cluster(2)
    reader, writer = cluster.connect(), cluster.connect()
    try:
        cached = reader.get_map("config", near_cache=True)
        assert reader.get_map("config", near_cache=True) is cached, "one near cache per map and handle"
        source = writer.get_map("config")
        source["mode"] = "fast"
        assert cached["mode"] == "fast"
        for _ in range(100):
            assert cached["mode"] == "fast"
        # (one read may miss: the event of the first write may come after the first read cached it)
        assert cached.stats()["near_cache"]["hits"] >= 99
        source["mode"] = "safe"
        wait_for(lambda: cached["mode"] == "safe", WAIT)
        cached["mode"] = "mine"
        assert cached["mode"] == "mine", "a client reads its own writes at once"
        source.clear()
        wait_for(lambda: cached.get("mode") is None, WAIT)
    finally:
        reader.close()
        writer.close()


def test_local_maps_have_listeners_and_near_caches_too():
    backend = LocalBackend(7)
    try:
        heard = Recorder()
        data = DMap("m", backend)
        data.add_entry_listener(heard)
        cached = DMap("m", backend, near_cache=2)
        data["a"] = 1
        assert cached["a"] == 1 and cached["a"] == 1
        data["a"] = 2
        wait_for(lambda: cached["a"] == 2, WAIT)
        wait_for(lambda: heard.seen() == [("added", "a", 1), ("updated", "a", 2)], WAIT)
        for key in "bcd":
            data[key] = key
            cached[key]
        assert cached.stats()["near_cache"]["entries"] <= 2, "it keeps at most its size"
        with pytest.raises(ValueError, match="near_cache"):
            DMap("m", backend, near_cache=-1)
    finally:
        backend.close()
