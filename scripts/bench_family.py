"""Issue 12's structures against their peers, side by side in one run: ``python scripts/bench.py --family``.

::

    lock       4 threads in 2 processes take and release one lock for a few seconds: acquisitions/s
               grid: cluster.get_lock on a sim LocalCluster of 2 | managers: SyncManager().Lock()
               | redis: redis-py's Lock (SET NX PX, a Lua release), polling every 1 ms
    topic      one publisher, 2 subscribers: messages/s until both got every message
               grid: get_topic (plain) | redis: PUBLISH / SUBSCRIBE (redis-py)
    jobs       grid.jobs with 2 workers against executor.map on the same function: jobs/s
    reduce     the sum of 10M ints: executor.map_reduce (mapped and reduced on the members) against
               sum(executor.map(...)) and functools.reduce of ProcessPoolExecutor's map

Everything stays on loopback and Unix sockets; redis rows are skipped if redis-server is not installed.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import operator
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

LOCK_SECONDS = 3.0
QUICK = {"lock_seconds": 1.0, "messages": 500, "jobs": 300, "ints": 1_000_000}
FULL = {"lock_seconds": LOCK_SECONDS, "messages": 5_000, "jobs": 2_000, "ints": 10_000_000}


# -- the lock: a child process runs 2 threads ---------------------------------------------------------------


_SHARED_LOCK = threading.Lock()


def _shared_lock():
    return _SHARED_LOCK


def _lock_manager_class():
    """A manager whose every client gets the one lock its server holds (SyncManager().Lock() makes a new one)."""
    from multiprocessing.managers import AcquirerProxy, BaseManager

    class LockManager(BaseManager):
        pass

    LockManager.register("get_lock", callable=_shared_lock, proxytype=AcquirerProxy)
    return LockManager



def lock_child(kind: str, where: str, seconds: float) -> int:
    """(A child process) 2 threads take and release the lock for ``seconds``; print the count."""
    counts = [0, 0]
    if kind == "grid":
        import grid

        handle = grid.connect(json.loads(where))
        locks = [handle.get_lock("bench-lock") for _ in range(2)]
    elif kind == "managers":
        address, key = json.loads(where)
        manager = _lock_manager_class()(address=tuple(address), authkey=key.encode())
        manager.connect()
        shared = manager.get_lock()
        locks = [shared, shared]
    else:
        import redis

        client = redis.Redis(unix_socket_path=where)
        locks = [client.lock("bench-lock", timeout=10, sleep=0.001) for _ in range(2)]
    start = threading.Barrier(3)

    def spin(index):
        lock = locks[index]
        start.wait()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            lock.acquire()
            lock.release()
            counts[index] += 1

    threads = [threading.Thread(target=spin, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    start.wait()
    for thread in threads:
        thread.join()
    print(sum(counts), flush=True)
    if kind == "grid":
        handle.close()
    return 0


def _two_children(kind: str, where: str, seconds: float) -> float:
    children = [subprocess.Popen([sys.executable, __file__, "--lock-child", kind, where, str(seconds)],
                                 stdout=subprocess.PIPE, text=True) for _ in range(2)]
    total = 0
    for child in children:
        out, _ = child.communicate(timeout=seconds + 60)
        if child.returncode != 0:
            raise RuntimeError(f"a {kind} lock child failed with exit code {child.returncode}")
        total += int(out.strip().splitlines()[-1])
    return total / seconds


class RedisServer:
    """A redis-server on a Unix socket in a temporary folder (no port), for the redis rows."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="grid-bench-redis-")
        self.socket = os.path.join(self.folder, "redis.sock")
        self.process = subprocess.Popen([shutil.which("redis-server"), "--port", "0", "--unixsocket", self.socket,
                                         "--save", "", "--appendonly", "no", "--dir", self.folder],
                                        stdout=subprocess.DEVNULL)
        import redis

        client = redis.Redis(unix_socket_path=self.socket)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def redis_available() -> str | None:
    """Why the redis rows are skipped, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed"
    return None


# -- the topic ---------------------------------------------------------------------------------------------


def _topic_rate(publish, subscribe, messages: int) -> float:
    got = [0, 0]
    done = threading.Event()

    def counter(index):
        def seen(_message):
            got[index] += 1
            if got[0] >= messages and got[1] >= messages:
                done.set()
        return seen

    stoppers = [subscribe(counter(index)) for index in range(2)]
    start = time.perf_counter()
    for number in range(messages):
        publish(number)
    if not done.wait(120):
        raise RuntimeError(f"the subscribers got {got} of {messages} messages in 120 s")
    elapsed = time.perf_counter() - start
    for stop in stoppers:
        stop()
    return messages / elapsed


def grid_topic(client, subscribers, messages: int) -> float:
    topic = client.get_topic("bench-topic")

    def subscribe(fn):
        handle = subscribers.pop()
        subscription = handle.get_topic("bench-topic").subscribe(fn)
        return subscription.cancel

    return _topic_rate(topic.publish, subscribe, messages)


def redis_topic(server: RedisServer, messages: int) -> float:
    import redis

    publisher = redis.Redis(unix_socket_path=server.socket)
    subscribed = [0]

    def subscribe(fn):
        pubsub = redis.Redis(unix_socket_path=server.socket).pubsub()
        pubsub.subscribe(**{"bench-topic": lambda message: fn(message["data"])})
        thread = pubsub.run_in_thread(sleep_time=0.001, daemon=True)
        subscribed[0] += 1
        deadline = time.monotonic() + 10
        while publisher.pubsub_numsub("bench-topic")[0][1] < subscribed[0]:
            if time.monotonic() > deadline:
                raise RuntimeError("a redis subscriber did not subscribe in 10 s")
            time.sleep(0.01)
        return thread.stop

    return _topic_rate(lambda number: publisher.publish("bench-topic", number), subscribe, messages)


# -- the whole run -------------------------------------------------------------------------------------------


def run(quick: bool) -> int:
    import grid
    from sim import LocalCluster

    counts = QUICK if quick else FULL
    print(f"issue 12's structures ({'quick' if quick else 'full'} counts: {counts})")
    rows: list[tuple[str, dict]] = []
    skip_redis = redis_available()
    server = RedisServer() if skip_redis is None else None
    try:
        with LocalCluster(2, backup_count=1) as cluster:
            config = json.dumps(cluster.config())
            lock = {"grid": _two_children("grid", config, counts["lock_seconds"])}
            manager = _lock_manager_class()(address=("127.0.0.1", 0), authkey=b"bench")
            manager.start()
            try:
                lock["managers"] = _two_children("managers", json.dumps([manager.address, "bench"]),
                                                 counts["lock_seconds"])
            finally:
                manager.shutdown()
            if server is not None:
                lock["redis"] = _two_children("redis", server.socket, counts["lock_seconds"])
            rows.append(("contended lock, 4 threads in 2 processes (acquisitions/s)", lock))
            print(f"[lock] {lock}", flush=True)

            client = cluster.connect()
            subscribers = [cluster.connect() for _ in range(2)]
            try:
                topic = {"grid": grid_topic(client, list(subscribers), counts["messages"])}
                if server is not None:
                    topic["redis"] = redis_topic(server, counts["messages"])
                rows.append(("topic to 2 subscribers (messages/s)", topic))
                print(f"[topic] {topic}", flush=True)

                executor = client.executor()
                payloads = list(range(counts["jobs"]))
                workers = grid.jobs.spawn_workers(2, operator.neg, cluster=client)
                try:
                    start = time.perf_counter()
                    handles = grid.jobs.request_jobs(payloads, cluster=client)
                    assert grid.jobs.results(handles, timeout=600) == [-n for n in payloads]
                    jobs_rate = len(payloads) / (time.perf_counter() - start)
                finally:
                    workers.stop()
                start = time.perf_counter()
                assert list(executor.map(operator.neg, payloads)) == [-n for n in payloads]
                rows.append(("the job queue, 2 workers, against executor.map (jobs/s)",
                             {"grid": jobs_rate, "executor.map": len(payloads) / (time.perf_counter() - start)}))
                print(f"[jobs] {rows[-1][1]}", flush=True)

                ints = range(counts["ints"])
                expected = sum(ints)
                start = time.perf_counter()
                assert executor.map_reduce(operator.pos, operator.add, ints) == expected
                reduce_s = time.perf_counter() - start
                start = time.perf_counter()
                assert sum(executor.map(operator.pos, ints, chunksize=100_000)) == expected
                map_s = time.perf_counter() - start
            finally:
                for handle in (client, *subscribers):
                    handle.close()
        with concurrent.futures.ProcessPoolExecutor(2) as pool:
            start = time.perf_counter()
            assert functools.reduce(operator.add, pool.map(operator.pos, ints, chunksize=100_000)) == expected
            ppe_s = time.perf_counter() - start
        rows.append((f"sum of {counts['ints']:,} ints (seconds; lower is better)",
                     {"grid": reduce_s, "sum(executor.map)": map_s, "reduce(PPE map)": ppe_s}))
        print(f"[reduce] {rows[-1][1]}", flush=True)
    finally:
        if server is not None:
            server.close()
    print()
    for label, values in rows:
        print(f"{label}: " + ", ".join(f"{name} {value:,.1f}" for name, value in values.items()))
        grid_value = values["grid"]
        lower_better = "seconds" in label
        ratios = [f"vs {name} {(value / grid_value if lower_better else grid_value / value):.2f}x"
                  for name, value in values.items() if name != "grid"]
        print("  grid's ratio (>1: grid is better): " + ", ".join(ratios))
    if skip_redis:
        print(f"redis rows skipped: {skip_redis}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--lock-child":
        sys.exit(lock_child(sys.argv[2], sys.argv[3], float(sys.argv[4])))
    sys.exit(run("--quick" in sys.argv))
