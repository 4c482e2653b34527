"""The legacy job queue: workers on the members pull jobs from a shared queue and put results back.

::

    spawn_workers(n, fn)   n long-running tasks on the members, each a worker:
                             holds its liveness lock "grid.jobs.<name>.worker.<id>" (a lease its member renews)
                             loop: (job id, payload) = queue.get(); taken[id] = worker; results[id] = fn(payload)
    request_jobs(payloads) payloads[id] = payload, then queue.put_all((id, payload), ...): a JobHandle each
    results() / as_completed() / handle.result()
                           wait for results[id]; every second, a job taken by a worker whose liveness
                           lock is free (it died: its lease ran out) goes back on the queue (once: the
                           taken entry is removed only if it still names that worker)

It is the slower path next to the executor (every job is a queue get, three map writes and a
result read, and a waiting caller looks for results instead of being sent them), kept for pools of
long-running workers. A job runs at least once: one whose worker died after finishing it, but
before its result was written, runs again; the first result written is the one kept.
"""

from __future__ import annotations

import queue as queue_module
import threading
import time
import uuid as uuid_module

from .errors import GridError

_REAP_EVERY = 1.0  # seconds between looks for jobs whose worker died
_POLL_FIRST, _POLL_LONGEST = 0.002, 0.1  # a waiting caller looks for results this often, doubling


def _names(name: str) -> dict:
    base = f"grid.jobs.{name}"
    return {"queue": f"{base}.queue", "payloads": f"{base}.payloads", "results": f"{base}.results",
            "taken": f"{base}.taken", "control": f"{base}.control", "worker": f"{base}.worker."}


def _cluster(cluster):
    if cluster is not None:
        return cluster
    from .client import default_executor
    return default_executor().cluster


# -- the workers, on the members -------------------------------------------------------------------------------


def work(name: str, fn, generation: str) -> int:
    """(A task on a member) be a worker until the pool's generation is stopped; the jobs done."""
    from .client import cluster as member_cluster

    here = member_cluster()  # (the member's own handle)
    names = _names(name)
    # Its own id for each run: a worker task the executor runs again (its member died) must not
    # take the dead run's lock, which tells the callers that the dead run's job needs doing again.
    worker = uuid_module.uuid4().hex
    jobs, results, taken = here.get_queue(names["queue"]), here.get_map(names["results"]), here.get_map(names["taken"])
    control = here.get_map(names["control"])
    alive = here.get_lock(names["worker"] + worker)
    alive.acquire()
    done = 0
    try:
        while control.get("stopped") != generation:
            try:
                job_id, payload = jobs.get(timeout=0.5)
            except queue_module.Empty:
                continue
            taken[job_id] = worker
            try:
                outcome = ("ok", fn(payload))
            except Exception as exc:  # noqa: BLE001 - the job's error is its result
                outcome = ("error", exc)
            try:
                results.put_if_absent(job_id, outcome)  # (a job run again: the first result stays)
            except TypeError as exc:  # its value cannot travel: that is its result
                results.put_if_absent(job_id, ("error", GridError(f"job {job_id}'s result cannot be sent: {exc}")))
            taken.remove_if_same(job_id, worker)
            done += 1
    finally:
        alive.release()
    return done


class Workers:
    """The workers ``spawn_workers`` started: ``stop()`` ends them (each finishes its job first)."""

    def __init__(self, cluster, name: str, futures: list, generation: str):
        self.cluster, self.name, self.futures, self._generation = cluster, name, futures, generation

    def stop(self, timeout: float | None = 60.0) -> int:
        """Stop every worker; the jobs they did."""
        self.cluster.get_map(_names(self.name)["control"])["stopped"] = self._generation
        return sum(future.result(timeout) for future in self.futures)


def spawn_workers(n: int, fn, *, cluster=None, name: str = "jobs") -> Workers:
    """Start ``n`` workers on the members, each doing ``fn(payload)`` for the jobs of queue ``name``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"spawn_workers takes a number of workers of 1 or more, not {n!r}")
    if not callable(fn):
        raise TypeError(f"spawn_workers takes a callable, not {fn!r}")
    cluster = _cluster(cluster)
    generation = uuid_module.uuid4().hex
    cluster.get_map(_names(name)["control"]).pop("stopped", None)
    executor = cluster.executor()
    futures = [executor.submit(work, name, fn, generation) for _ in range(n)]
    return Workers(cluster, name, futures, generation)


# -- the caller's side -------------------------------------------------------------------------------------------


class JobHandle:
    """One job ``request_jobs`` queued: ``result()`` waits for its worker's result."""

    def __init__(self, board: _Board, job_id: str):
        self._board, self.id = board, job_id

    def done(self) -> bool:
        return self._board.outcome(self.id) is not None

    def result(self, timeout: float | None = None):
        """The job's result; its error raised; TimeoutError after ``timeout`` seconds."""
        for handle in as_completed([self], timeout):
            return handle._value()
        raise AssertionError("unreachable")

    def _value(self):
        kind, value = self._board.outcome(self.id)
        if kind == "error":
            raise value
        return value

    def __repr__(self) -> str:
        return f"<JobHandle {self.id} {'done' if self.done() else 'pending'}>"


class _Board:
    """A queue's structures, as one caller sees them; it puts back the jobs of workers that died."""

    def __init__(self, cluster, name: str):
        names = _names(name)
        self.cluster, self.names = cluster, names
        self.queue, self.payloads = cluster.get_queue(names["queue"]), cluster.get_map(names["payloads"])
        self.results, self.taken = cluster.get_map(names["results"]), cluster.get_map(names["taken"])
        self._seen: dict = {}
        self._lock = threading.Lock()
        self._reaped_at = time.monotonic()

    def outcome(self, job_id: str):
        with self._lock:
            found = self._seen.get(job_id)
        if found is None:
            found = self.results.get(job_id)
            if found is not None:
                with self._lock:
                    self._seen[job_id] = found
        return found

    def look(self, job_ids) -> set:
        """Which of ``job_ids`` have results now (one batch read)."""
        with self._lock:
            missing = [job_id for job_id in job_ids if job_id not in self._seen]
        if missing:
            found = self.results.get_all(missing)
            with self._lock:
                self._seen.update(found)
        with self._lock:
            return {job_id for job_id in job_ids if job_id in self._seen}

    def reap(self) -> int:
        """Put back on the queue each job taken by a worker that died; how many."""
        if time.monotonic() - self._reaped_at < _REAP_EVERY:
            return 0
        self._reaped_at = time.monotonic()
        again = 0
        for job_id, worker in list(self.taken.items()):
            if self.cluster.get_lock(self.names["worker"] + worker).locked():
                continue
            if job_id in self.results or not self.taken.remove_if_same(job_id, worker):
                continue
            payload = self.payloads.get(job_id)
            self.queue.put((job_id, payload))
            again += 1
        return again


def request_jobs(payloads, *, cluster=None, name: str = "jobs") -> list[JobHandle]:
    """Queue a job for each payload; their handles, in order."""
    board = _Board(_cluster(cluster), name)  # (one per call: the handles keep it, and nothing else does)
    jobs = [(uuid_module.uuid4().hex, payload) for payload in payloads]
    board.payloads.put_all(dict(jobs))
    board.queue.put_all(jobs)
    return [JobHandle(board, job_id) for job_id, _ in jobs]


def as_completed(handles, timeout: float | None = None):
    """The handles as their jobs complete (TimeoutError if some are not done after ``timeout`` s)."""
    pending = {handle.id: handle for handle in handles}
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = _POLL_FIRST
    wake = threading.Event()  # (never set: a pause that nothing else can end)
    while pending:
        by_board: dict = {}
        for handle in pending.values():
            by_board.setdefault(handle._board, []).append(handle.id)
        finished = set()
        for board, job_ids in by_board.items():
            finished |= board.look(job_ids)
            board.reap()
        if finished:
            pause = _POLL_FIRST
            for job_id in finished:
                yield pending.pop(job_id)
            continue
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"{len(pending)} of the jobs are not done after {timeout:g} s")
        wake.wait(pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(2 * pause, _POLL_LONGEST)


def results(handles, timeout: float | None = None) -> list:
    """Every job's result, in the order of ``handles`` (the first error raised)."""
    handles = list(handles)
    for _ in as_completed(handles, timeout):
        pass
    return [handle._value() for handle in handles]
