"""Lock and Semaphore (grid.data.sync) over replicas in this process: threading's behaviour and errors,
leases that run out, fencing tokens that only grow and that a partition enforces."""

from __future__ import annotations

import threading

import pytest

from grid.data.counter import Counter
from grid.data.dmap import DMap
from grid.data.locks import LOCK
from grid.data.store import LocalBackend, Op, Replica, StaleToken
from grid.data.sync import FencingToken, Lock, LockLost, Semaphore, Session

from .conftest import wait_for

PARTITIONS = 7
LEASE = 10.0
WAIT = 10


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def world():
    """A backend on a wall clock the test moves, and sessions on it (closed after the test)."""
    clock = Clock()
    backend = LocalBackend(PARTITIONS, clock=clock)
    sessions = []

    def session(lease: float = LEASE) -> Session:
        sessions.append(Session(backend, lease))
        return sessions[-1]

    yield clock, backend, session
    for made in sessions:
        made.close()


def test_a_lock_acquires_releases_and_refuses_as_threadings(world):
    clock, backend, session = world
    lock = Lock("l", backend, session())
    assert not lock.locked()
    token = lock.acquire()
    assert isinstance(token, FencingToken) and token > 0 and token.lock == "l" and lock.locked()
    assert lock.acquire(blocking=False) is False, "not reentrant: its holder cannot take it again"
    assert lock.acquire(timeout=0.05) is False
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        lock.release()
    with pytest.raises(ValueError, match="can't specify a timeout for a non-blocking call"):
        lock.acquire(blocking=False, timeout=1)
    with pytest.raises(ValueError, match="timeout value must be positive"):
        lock.acquire(timeout=-2)
    with lock as second:
        assert second > token, "each acquisition's token is larger"
        other_thread = []
        thread = threading.Thread(target=lambda: other_thread.append(pytest.raises(RuntimeError, lock.release)))
        thread.start()
        thread.join(WAIT)
        assert "cannot release un-acquired lock" in str(other_thread[0].value)
    assert not lock.locked()


def test_a_reentrant_lock_is_released_by_as_many_releases(world):
    clock, backend, session = world
    lock = Lock("r", backend, session(), reentrant=True)
    first = lock.acquire()
    assert lock.acquire() == first  # (the same hold: the same token)
    lock.release()
    assert lock.locked()
    lock.release()
    assert not lock.locked()


def test_a_blocked_acquire_wakes_when_the_holder_releases(world):
    clock, backend, session = world
    holder, waiter = Lock("b", backend, session()), Lock("b", backend, session())
    holder.acquire()
    got = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire(timeout=WAIT)))
    thread.start()
    wait_for(lambda: thread.is_alive(), WAIT)
    assert not got
    holder.release()
    thread.join(WAIT)
    assert got and got[0] > 0


def test_a_lease_that_runs_out_frees_the_lock_and_the_old_holders_token_is_refused(world):
    """The paused ex-holder finds out: its release raises LockLost, and a write fenced with its token
    is refused once its successor wrote with the newer one."""
    clock, backend, session = world
    paused, successor = Lock("f", backend, session()), Lock("f", backend, session())
    data, count = DMap("guarded", backend), Counter("guarded", backend)
    old = paused.acquire()
    data.put("x", "by the first holder", fence=old)
    count.add_and_get(1, fence=old)
    assert successor.acquire(blocking=False) is False
    clock.now += LEASE + 1  # the first holder stopped renewing (a pause, say)
    new = successor.acquire(blocking=False)
    assert new > old and new.lock == "f"
    data.put("x", "by the second holder", fence=new)
    count.add_and_get(1, fence=new)
    with pytest.raises(StaleToken, match="newer token"):
        data.put("x", "a stale write", fence=old)
    with pytest.raises(StaleToken):
        count.add_and_get(1, fence=old)
    with pytest.raises(LockLost, match="ran out"):
        paused.release()
    assert data["x"] == "by the second holder" and count.get() == 2
    data.put("x", "the newest holder may write again", fence=new)
    with pytest.raises(TypeError, match="fence= takes the token"):
        data.put("x", 1, fence=7)


def test_a_session_renews_its_leases_and_its_close_releases_them():
    backend = LocalBackend(PARTITIONS)  # (the real clock: leases of 0.3 s, renewed every 0.1 s)
    holding, other = Session(backend, 0.3), Session(backend, 0.3)
    try:
        lock, rival = Lock("renewed", backend, holding), Lock("renewed", backend, other)
        semaphore = Semaphore("renewed-permits", backend, holding, 2)
        token = lock.acquire()
        assert semaphore.acquire(n=2)
        renewals = []
        real = backend.execute

        def counting(partition, op):
            if op.action == "renew":
                renewals.append(op.kind)
            return real(partition, op)

        backend.execute = counting
        backend.execute_many = lambda items: [counting(p, op) for p, op in items]
        wait_for(lambda: renewals.count(LOCK) >= 4, WAIT)  # past several leases
        assert rival.acquire(blocking=False) is False and semaphore.available() == 0
        assert lock._read("state")[2] == token
        holding.close()
        assert rival.acquire(blocking=False), "a closed handle's lock is released"
        assert semaphore.available() == 2, "and its permits are back"
    finally:
        holding.close()
        other.close()


def test_a_semaphore_counts_permits_as_threadings_and_gets_them_back_from_a_lapsed_holder(world):
    clock, backend, session = world
    mine, theirs = session(), session()
    first = Semaphore("s", backend, mine, 3)
    again = Semaphore("s", backend, theirs, 99)
    assert again.permits == 3, "the first get_semaphore of a name set its permits"
    assert first.acquire(n=2) and first.available() == 1
    assert again.acquire(blocking=False, n=2) is False
    assert again.acquire(timeout=0.05) is True and first.available() == 0
    with pytest.raises(ValueError, match="Semaphore released too many times"):
        again.release(n=2)
    with pytest.raises(ValueError, match="n must be one or more"):
        first.acquire(n=0)
    with pytest.raises(ValueError, match="can't specify timeout for non-blocking acquire"):
        first.acquire(blocking=False, timeout=1)
    with pytest.raises(ValueError, match="semaphore initial value must be >= 0"):
        Semaphore("negative", backend, mine, -1)
    clock.now += LEASE + 1  # both lapse
    assert first.available() == 3
    with pytest.raises(ValueError):  # (theirs lapsed: it holds nothing to give back)
        again.release()
    with first:
        assert first.available() == 2
    assert first.available() == 3


def test_fencing_tokens_only_grow_through_a_failover_and_a_destroyed_lock():
    """A token is its acquisition's stamp (table version, seq): a promoted backup's next token is
    larger than any its old owner gave, and so is a destroyed lock's when it is made again."""
    owner, backup = Replica(0), Replica(0)
    tokens = []

    def acquire_and_release(replica, table_version, session):
        replica.follow(table_version)
        outcome = replica.execute(Op(LOCK, "l", "acquire", (session, 1, LEASE, False), f"{session}-a", table_version))
        tokens.append(outcome.result[0])
        released = replica.execute(Op(LOCK, "l", "release", (session, 1), f"{session}-r", table_version))
        return [outcome.record, released.record]

    for record in acquire_and_release(owner, 1, "s1") + acquire_and_release(owner, 1, "s2"):
        backup.replicate(record)
    owner.execute(Op(LOCK, "l", "destroy", (), "d", 1))
    acquire_and_release(owner, 1, "s3")
    acquire_and_release(backup, 2, "s4")  # the backup, promoted by table 2
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    fenced = Replica.restore(backup.snapshot())
    assert fenced.snapshot()["structures"] == backup.snapshot()["structures"]
