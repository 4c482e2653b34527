"""Lock and Semaphore: ``threading``'s, for a cluster, held by leases that their handle renews.

::

    lock.acquire() --> Op(LOCK, name, "acquire", (session, thread, lease, reentrant), call id)
                   --> (token, 0.0): held, the token returned | (0, s): wait for a change of the
                       partition (a release), or s seconds (the holder's lease may run out), try again
    Session (one per cluster handle): the thread "grid-leases" renews what the handle holds every
        third of a lease; the handle's close ends the session (what it holds is released)

A holder whose process dies, pauses or is cut off from the cluster stops renewing, and once its
lease runs out (``lease`` seconds: twice the handle's ``failure_timeout``) the lock is free:
its next holder gets a larger fencing token. The paused ex-holder finds out when it releases
(``LockLost``), or sooner from a write it fences with its token (``map.put(k, v, fence=token)``):
a partition that saw a newer token of that lock refuses it (``StaleToken``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid as uuid_module

from ..errors import GridError
from .locks import LOCK, SEMAPHORE
from .single import InItsPartition

log = logging.getLogger("grid.data")


class LockLost(GridError):
    """The lock's lease ran out while this holder held it (it stopped renewing: paused or cut off),
    so another may have held it since; what was done under it may have raced with that holder."""


class FencingToken(int):
    """The number a lock's acquisition returns, which only grows; it names its lock for ``fence=``."""

    def __new__(cls, value: int, lock: str):
        token = super().__new__(cls, value)
        token.lock = lock
        return token

    def __reduce__(self):
        return (FencingToken, (int(self), self.lock))

    def __repr__(self) -> str:
        return f"FencingToken({int(self)}, lock={self.lock!r})"


def fence_of(token) -> tuple:
    """``(lock name, token)`` for an op's ``fence`` (``()`` for None)."""
    if token is None:
        return ()
    if not isinstance(token, FencingToken):
        raise TypeError(f"fence= takes the token a Lock's acquire returned, not {token!r}")
    return (token.lock, int(token))


class Session:
    """A cluster handle's hold on locks and permits: renews their leases, and ends them on close."""

    def __init__(self, backend, lease: float):
        self.id = uuid_module.uuid4().hex
        self.lease = float(lease)
        self._backend = backend
        self._held: dict[tuple, list] = {}  # (kind, name, thread: a lock's holder, or None) -> [partition, holds]
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: set = set()  # (kind, name, thread) whose lease a renewal found gone

    def hold(self, kind: str, name: str, partition: int, thread=None) -> None:
        with self._lock:
            entry = self._held.setdefault((kind, name, thread), [partition, 0])
            entry[1] += 1
            self.lost.discard((kind, name, thread))
            if self._thread is None and not self._stopped.is_set():
                self._thread = threading.Thread(target=self._renew, name="grid-leases", daemon=True)
                self._thread.start()

    def holds(self, kind: str, name: str, thread=None) -> bool:
        """Whether this session (``thread`` of it) took ``name`` and did not give it back (it may have lost it since)."""
        with self._lock:
            return (kind, name, thread) in self._held or (kind, name, thread) in self.lost

    def drop(self, kind: str, name: str, all_of_them: bool = False, thread=None) -> None:
        with self._lock:
            self.lost.discard((kind, name, thread))
            entry = self._held.get((kind, name, thread))
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0 or all_of_them:
                    del self._held[kind, name, thread]

    def _renew(self) -> None:
        from .store import Op  # (here: the store's Op, made per renewal)
        while not self._stopped.wait(self.lease / 3):
            with self._lock:
                held = list(self._held.items())
            if not held:
                continue
            try:
                answers = self._backend.execute_many([(partition, Op(kind, name, "renew", (self.id, self.lease)))
                                                      for (kind, name, _), (partition, _) in held])
            except Exception as exc:  # noqa: BLE001 - said; the next round tries again
                log.warning("could not renew the leases of %d locks and semaphores: %s", len(held), exc)
                continue
            for (key, _), renewed in zip(held, answers):
                if not renewed:
                    log.warning("the lease on %s %r ran out before it was renewed (this process paused, or was "
                                "cut off): it is no longer held here", key[0], key[1])
                    with self._lock:
                        self.lost.add(key)
                        self._held.pop(key, None)

    def close(self) -> None:
        """Stop renewing, and release what this session holds."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        from .store import Op
        with self._lock:
            held, self._held = list(self._held.items()), {}
        if held:
            try:
                self._backend.execute_many([(partition, Op(kind, name, "end_session", (self.id,)))
                                            for (kind, name, _), (partition, _) in held])
            except Exception as exc:  # noqa: BLE001 - their leases run out instead
                log.warning("could not release %d locks and semaphores on close (%s): their leases run out "
                            "in %g s", len(held), exc, self.lease)


def _check_wait(blocking: bool, timeout, non_blocking_message: str):
    """threading's argument rules: the seconds to wait (None: no limit)."""
    if not blocking:
        if timeout != -1:
            raise ValueError(non_blocking_message)
        return 0.0
    if timeout == -1:
        return None
    if timeout < 0:
        raise ValueError("timeout value must be positive")
    return float(timeout)


class _Leased(InItsPartition):
    """What Lock and Semaphore share: blocking tries, waiting on the owner for a change."""

    def __init__(self, name: str, backend, session: Session):
        super().__init__(name, backend)
        self._session = session

    def _until(self, attempt, wait: float | None):
        """``attempt()`` -> ``(result, seconds until it may succeed)`` until the result is true or
        ``wait`` seconds passed (None: no limit); the last result."""
        deadline = None if wait is None else time.monotonic() + wait
        seen = self._backend.wait_for_change(self._partition)  # (before the try: a change after it wakes us)
        while True:
            result, hint = attempt()
            if result or wait == 0:
                return result
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return result
            # A release changes the partition; a lease that runs out changes nothing: wake by then.
            pause = hint + 0.01 if hint > 0 else None
            slice_ = pause if remaining is None else (remaining if pause is None else min(pause, remaining))
            seen = self._backend.wait_for_change(self._partition, seen, slice_)


class Lock(_Leased):
    """A distributed lock named ``name``; make one with ``cluster.get_lock(name, reentrant=False)``.

    ``acquire`` returns a ``FencingToken`` (an int that grows with each acquisition) or False,
    as ``threading.Lock.acquire`` returns True or False; ``with lock:`` holds it for the block. A
    reentrant lock may be acquired again by its holder (the same thread of the same handle), and is
    released by as many releases.
    """

    KIND = LOCK

    def __init__(self, name: str, backend, session: Session, reentrant: bool = False):
        super().__init__(name, backend, session)
        self.reentrant = bool(reentrant)

    def acquire(self, blocking: bool = True, timeout: float = -1):
        """Take the lock, waiting for it if ``blocking`` (at most ``timeout`` seconds; -1: no limit).

        Returns:
            The fencing token (true), or False if it was not taken in time.
        """
        wait = _check_wait(blocking, timeout, "can't specify a timeout for a non-blocking call")
        me, session = threading.get_ident(), self._session
        token = self._until(lambda: self._write("acquire", session.id, me, session.lease, self.reentrant), wait)
        if not token:
            return False
        session.hold(LOCK, self.name, self._partition, me)
        return FencingToken(token, self.name)

    def release(self) -> None:
        """Release the lock (a reentrant one: once as often as it was acquired).

        Raises:
            RuntimeError: this thread of this handle does not hold it (threading's messages).
            LockLost: it was held, but its lease ran out (another may have held it since).
        """
        session, me = self._session, threading.get_ident()
        try:
            released = self._write("release", session.id, me)
        except LockLost:
            session.drop(LOCK, self.name, all_of_them=True, thread=me)
            raise
        except RuntimeError:
            if not session.holds(LOCK, self.name, me):
                raise
            session.drop(LOCK, self.name, all_of_them=True, thread=me)  # (it held it; another holds it now)
            raise LockLost(f"the lease on lock {self.name!r} ran out before this release (this handle stopped "
                           "renewing it: paused or cut off), and another holder took it since") from None
        session.drop(LOCK, self.name, all_of_them=released, thread=me)

    def locked(self) -> bool:
        """Whether some holder has it now."""
        return self._read("state")[0] is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


Lock.ERRORS = {"LockLost": LockLost}


class Semaphore(_Leased):
    """A distributed semaphore named ``name``; make one with ``cluster.get_semaphore(name, permits)``.

    ``threading.Semaphore``'s ``acquire``/``release`` (with ``n``), held by this handle: any of its
    threads may release what another acquired, and a handle's permits come back when it dies or
    closes. The first ``get_semaphore`` of a name sets its permits; later ones find them.
    """

    KIND = SEMAPHORE

    def __init__(self, name: str, backend, session: Session, permits: int):
        self.check_permits(permits)
        super().__init__(name, backend, session)
        self.permits = self._write("init", permits)

    @staticmethod
    def check_permits(permits) -> None:
        if isinstance(permits, bool) or not isinstance(permits, int):
            raise TypeError(f"a semaphore's permits are an int, not {permits!r}")
        if permits < 0:
            raise ValueError("semaphore initial value must be >= 0")

    def acquire(self, blocking: bool = True, timeout: float | None = None, n: int = 1) -> bool:
        """Take ``n`` permits, waiting for them if ``blocking`` (at most ``timeout`` seconds; None: no
        limit); True once taken, False if not in time (``threading.Semaphore.acquire``)."""
        if n < 1:
            raise ValueError("n must be one or more")
        wait = _check_wait(blocking, -1 if timeout is None else timeout, "can't specify timeout for non-blocking acquire")
        session = self._session
        if self._until(lambda: self._write("acquire", session.id, n, session.lease), wait):
            for _ in range(n):
                session.hold(SEMAPHORE, self.name, self._partition)
            return True
        return False

    def release(self, n: int = 1) -> None:
        """Give back ``n`` permits this handle holds.

        Raises:
            ValueError: this handle holds fewer (``threading.BoundedSemaphore``'s message).
        """
        if n < 1:
            raise ValueError("n must be one or more")
        self._write("release", self._session.id, n)
        for _ in range(n):
            self._session.drop(SEMAPHORE, self.name)

    def available(self) -> int:
        """Permits free now."""
        return self._read("available")

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
