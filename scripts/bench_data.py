"""The data structures against their peers, side by side in one run: ``python scripts/bench.py --data``.

::

    grid      a sim LocalCluster of 2 members (backup_count = 1), a client in this process:
              cluster.get_map(...) ops, each put acknowledged once the backup applied it
    redis     redis-server (if installed) on a Unix socket with one replica (--replicaof), redis-py:
              GET, SET, SET + WAIT 1 (the replica acknowledged it), a pipeline of SETs, MGET
    managers  multiprocessing.managers.SyncManager's dict proxy (one server process holds it all)

One client thread, 100-byte values, keys "key-N". Latencies are medians of N sequential ops after
a warm-up; batches are 1000 keys. Memory: member RSS growth per entry for the entries written,
against redis-server's used_memory growth (both one copy: grid's primary plus its backup is
counted per member, so the figure is per copy). Everything stays on loopback and Unix sockets.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

VALUE = b"v" * 100
BATCH = 1000


def _median_us(fn, count: int) -> float:
    samples = []
    for index in range(count):
        start = time.perf_counter_ns()
        fn(index)
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def _batch_us(fn, repeat: int) -> float:
    times = []
    for round_ in range(repeat):
        start = time.perf_counter_ns()
        fn(round_)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# -- grid ------------------------------------------------------------------------------------------


def bench_grid(counts) -> dict:
    from sim import LocalCluster

    results = {}
    with LocalCluster(2, backup_count=1) as cluster:
        client = cluster.connect()
        try:
            data = client.get_map("bench")
            for index in range(200):
                data[f"warm-{index}"] = VALUE
            results["put_us"] = _median_us(lambda i: data.set(f"key-{i}", VALUE), counts["ops"])
            results["get_us"] = _median_us(lambda i: data[f"key-{i}"], counts["ops"])
            batches = [{f"batch-{r}-{i}": VALUE for i in range(BATCH)} for r in range(counts["batches"])]
            results["put_all_us"] = _batch_us(lambda r: data.put_all(batches[r]), counts["batches"])
            keys = [list(batch) for batch in batches]
            results["get_all_us"] = _batch_us(lambda r: data.get_all(keys[r]), counts["batches"])
            pids = [peer.popen.pid for peer in cluster.peers]
            before = sum(_rss_mb(pid) for pid in pids)
            entries = counts["memory_entries"]
            for start in range(0, entries, BATCH):
                data.put_all({f"mem-{i}": VALUE for i in range(start, min(entries, start + BATCH))})
            after = sum(_rss_mb(pid) for pid in pids)
            results["bytes_per_entry"] = (after - before) * 1024 * 1024 / entries / 2  # two copies
        finally:
            client.close()
    return results


# -- redis -----------------------------------------------------------------------------------------


def bench_redis(counts) -> dict | str:
    server = shutil.which("redis-server")
    if server is None:
        return "redis-server is not installed (apt-get install redis-server)"
    try:
        import redis
    except ImportError:
        return "redis-py is not installed (pip install redis)"
    folder = tempfile.mkdtemp(prefix="grid-bench-redis-")
    primary_sock, replica_sock = os.path.join(folder, "primary.sock"), os.path.join(folder, "replica.sock")
    common = ["--save", "", "--appendonly", "no", "--dir", folder, "--unixsocketperm", "700"]
    with socket.socket() as probe:  # a free port on loopback for the primary (replicaof takes host and port)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    primary = subprocess.Popen([server, *common, "--port", str(port), "--bind", "127.0.0.1",
                                "--unixsocket", primary_sock], stdout=subprocess.DEVNULL)
    replica = subprocess.Popen([server, *common, "--port", "0", "--unixsocket", replica_sock,
                                "--replicaof", "127.0.0.1", str(port)], stdout=subprocess.DEVNULL)
    results = {}
    try:
        client = redis.Redis(unix_socket_path=primary_sock)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.info("replication").get("connected_slaves", 0) >= 1:
                    break
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                return "redis-server's replica did not connect within 10 s"
            time.sleep(0.05)
        for index in range(200):
            client.set(f"warm-{index}", VALUE)
        results["set_us"] = _median_us(lambda i: client.set(f"key-{i}", VALUE), counts["ops"])

        def set_and_wait(i):
            client.set(f"key-{i}", VALUE)
            client.wait(1, 1000)

        results["put_us"] = _median_us(set_and_wait, counts["ops"])
        results["get_us"] = _median_us(lambda i: client.get(f"key-{i}"), counts["ops"])
        batches = [{f"batch-{r}-{i}": VALUE for i in range(BATCH)} for r in range(counts["batches"])]

        def pipeline(r):
            pipe = client.pipeline(transaction=False)
            for key, value in batches[r].items():
                pipe.set(key, value)
            pipe.execute()

        results["put_all_us"] = _batch_us(pipeline, counts["batches"])
        keys = [list(batch) for batch in batches]
        results["get_all_us"] = _batch_us(lambda r: client.mget(keys[r]), counts["batches"])
        before = client.info("memory")["used_memory"]
        entries = counts["memory_entries"]
        for start in range(0, entries, BATCH):
            client.mset({f"mem-{i}": VALUE for i in range(start, min(entries, start + BATCH))})
        results["bytes_per_entry"] = (client.info("memory")["used_memory"] - before) / entries
        client.close()
    finally:
        for process in (replica, primary):
            process.terminate()
            process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    return results


# -- multiprocessing.managers ---------------------------------------------------------------------------


def bench_managers(counts) -> dict:
    from multiprocessing.managers import SyncManager

    results = {}
    with SyncManager() as manager:
        data = manager.dict()
        for index in range(200):
            data[f"warm-{index}"] = VALUE

        def put(i):
            data[f"key-{i}"] = VALUE

        results["put_us"] = _median_us(put, counts["ops"])
        results["get_us"] = _median_us(lambda i: data[f"key-{i}"], counts["ops"])
        batches = [{f"batch-{r}-{i}": VALUE for i in range(BATCH)} for r in range(counts["batches"])]
        results["put_all_us"] = _batch_us(lambda r: data.update(batches[r]), counts["batches"])
        keys = [list(batch) for batch in batches]
        results["get_all_us"] = _batch_us(lambda r: [data[key] for key in keys[r]], counts["batches"])
    return results


# -- the report ----------------------------------------------------------------------------------------

ROWS = [
    ("get_us", "sequential get (µs)"),
    ("put_us", "sequential put, acknowledged by the backup (redis: SET + WAIT 1) (µs)"),
    ("set_us", "sequential SET without WAIT (redis only) (µs)"),
    ("put_all_us", f"put_all of {BATCH} keys (redis: a pipeline of SETs; managers: update) (µs)"),
    ("get_all_us", f"get_all of {BATCH} keys (redis: MGET; managers: one get each) (µs)"),
    ("bytes_per_entry", "memory per entry, one copy (bytes)"),
]


def run(quick: bool, counts: dict | None = None) -> int:
    counts = counts or {"ops": 500 if quick else 3000, "batches": 5 if quick else 20,
                        "memory_entries": 20_000 if quick else 200_000}
    print(f"data structures, one client thread, 100-byte values ({'quick' if quick else 'full'} counts: "
          f"{counts['ops']} ops, {counts['batches']} batches, {counts['memory_entries']:,} entries for memory)")
    outcomes = {}
    for name, bench in (("grid", bench_grid), ("redis", bench_redis), ("managers", bench_managers)):
        print(f"[{name}] ...", flush=True)
        try:
            outcomes[name] = bench(counts)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            outcomes[name] = f"failed: {type(exc).__name__}: {exc}"
        print(f"[{name}] {outcomes[name]}", flush=True)
    names = list(outcomes)
    width = max(len(label) for _, label in ROWS) + 2
    print("\n" + "".ljust(width) + "".join(name.rjust(12) for name in names))
    for key, label in ROWS:
        cells = []
        for name in names:
            outcome = outcomes[name]
            cells.append("skipped" if isinstance(outcome, str) else
                         f"{outcome[key]:.1f}" if key in outcome else "-")
        print(label.ljust(width) + "".join(cell.rjust(12) for cell in cells))
    grid = outcomes.get("grid")
    if isinstance(grid, dict):
        print("\ngrid's ratio (>1: grid is better; peer time / grid time, peer memory / grid memory)")
        for name in names[1:]:
            peer = outcomes[name]
            if isinstance(peer, str):
                print(f"  {name}: {peer}")
                continue
            parts = [f"{key} {peer[key] / grid[key]:.2f}x" for key, _ in ROWS if key in peer and key in grid]
            if name == "redis" and "set_us" in peer:
                parts.append(f"put vs plain SET {peer['set_us'] / grid['put_us']:.2f}x")
            print(f"  vs {name}: " + ", ".join(parts))
    for name, outcome in outcomes.items():
        if isinstance(outcome, str) and outcome.startswith("failed"):
            print(f"{name} {outcome}", file=sys.stderr)
    return 0
