"""Topic (grid.data.topic) over replicas in this process: every subscriber gets each message once, in
order; a reliable subscriber resumes from its sequence; one that fell behind the ring is told."""

from __future__ import annotations

import threading

import pytest

from grid.data.store import LocalBackend
from grid.data.topic import Topic

from .conftest import wait_for

PARTITIONS = 7
WAIT = 10


@pytest.fixture
def subscriptions():
    made = []
    yield made
    for subscription in made:
        subscription.cancel()
    assert not [s for s in made if s.active]


def test_every_subscriber_gets_each_message_once_in_each_publishers_order(subscriptions):
    backend = LocalBackend(PARTITIONS)
    topic = Topic("news", backend)
    got = {"a": [], "b": []}
    subscriptions += [topic.subscribe(got["a"].append), topic.subscribe(got["b"].append)]
    publishers = [Topic("news", backend) for _ in range(3)]
    threads = [threading.Thread(target=lambda p=p, n=n: [p.publish((n, i)) for i in range(50)])
               for n, p in enumerate(publishers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    wait_for(lambda: len(got["a"]) == 150 and len(got["b"]) == 150, WAIT)
    assert got["a"] == got["b"], "one order for every subscriber"
    for n in range(3):
        assert [i for who, i in got["a"] if who == n] == list(range(50)), "each publisher's order"


def test_a_subscriber_gets_what_is_published_after_it_subscribed_and_survives_its_own_errors(subscriptions):
    topic = Topic("later", LocalBackend(PARTITIONS))
    topic.publish("before")
    got = []

    def picky(message):
        if message == "bad":
            raise ValueError("the subscriber's own bug")
        got.append(message)

    subscriptions.append(topic.subscribe(picky))
    for message in ("one", "bad", "two"):
        topic.publish(message)
    wait_for(lambda: got == ["one", "two"], WAIT)


def test_a_reliable_subscriber_starts_and_resumes_from_a_sequence(subscriptions):
    topic = Topic("log", LocalBackend(PARTITIONS), reliable=True)
    sequences = [topic.publish(f"m{n}") for n in range(5)]
    assert sequences == list(range(5))
    got = []
    first = topic.subscribe(got.append, start=0)
    subscriptions.append(first)
    wait_for(lambda: len(got) == 5, WAIT)
    first.cancel()
    topic.publish("while away")
    subscriptions.append(topic.subscribe(got.append, start=first.sequence))  # (it resumes where it was)
    wait_for(lambda: got == [f"m{n}" for n in range(5)] + ["while away"], WAIT)
    with pytest.raises(ValueError, match="reliable"):
        Topic("log", topic._backend).subscribe(print, start=0)


def test_a_subscriber_that_fell_behind_the_ring_is_told_how_many_it_lost(subscriptions):
    topic = Topic("small", LocalBackend(PARTITIONS), reliable=True, capacity=10)
    for n in range(25):
        topic.publish(n)
    got, lost = [], []
    subscriptions.append(topic.subscribe(got.append, start=0, on_loss=lost.append))
    wait_for(lambda: len(got) == 10, WAIT)
    assert lost == [15] and got == list(range(15, 25))
    assert subscriptions[0].lost == 15
    with pytest.raises(ValueError, match="capacity"):
        Topic("bad", topic._backend, capacity=0)
