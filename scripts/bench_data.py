"""The data structures against their peers, side by side in one run: ``python scripts/bench.py --data``.

::

    grid      a sim LocalCluster of 2 members (backup_count = 1), a client in this process:
              cluster.get_map(...) ops, each put acknowledged once the backup applied it
    redis     redis-server (if installed) on a Unix socket with one replica (--replicaof), redis-py:
              GET, SET, SET + WAIT 1 (the replica acknowledged it), a pipeline of SETs, MGET
    managers  multiprocessing.managers.SyncManager's dict proxy (one server process holds it all)
    faults    (full run only) a sim LocalCluster of 2 with heartbeat_interval 0.2 s, failure_timeout 1.5 s:
              one thread puts for 12 s while a member joins (at 3 s) and member 1 is killed (at 7 s)

One client thread, 100-byte values, keys "key-N". Latencies are medians of N sequential ops after
a warm-up; batches are 1000 keys. The near-cache get reads one hot key through
get_map(..., near_cache=True), set against the peers' plain get. Memory: member RSS growth per entry
for the entries written with put_all (1,000,000 in the full run, within a time budget), against
redis-server's used_memory growth for as many (both one copy: grid's primary plus its backup is
counted per member, so the figure is per copy). Faults: acknowledged puts per 100 ms bucket, the
longest run of empty buckets against failure_timeout, and every acknowledged put read back.
Everything stays on loopback and Unix sockets.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

VALUE = b"v" * 100
BATCH = 1000
QUICK_COUNTS = {"ops": 500, "batches": 5, "memory_entries": 20_000, "memory_seconds": 60, "fault_seconds": 0}
FULL_COUNTS = {"ops": 3000, "batches": 20, "memory_entries": 1_000_000, "memory_seconds": 180,
               "fault_seconds": 12}
FAULT_TIMING = {"heartbeat_interval": 0.2, "failure_timeout": 1.5}
FAULT_JOIN_AT, FAULT_KILL_AT = 3.0, 7.0  # seconds into the fault run
FAULT_BUCKET = 0.1  # seconds of acknowledged puts counted together
TARGET_NEAR_RATIO, TARGET_MEMORY_RATIO = 10.0, 2.0  # the issue's: near get >= 10x redis GET; memory <= 2x


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


def _fill(write_batch, entries: int, budget_seconds: float) -> tuple[int, float]:
    """Write "mem-N" entries a batch at a time until ``entries`` or the budget is spent: (written, seconds)."""
    start = time.monotonic()
    written = 0
    while written < entries and time.monotonic() - start < budget_seconds:
        end = min(entries, written + BATCH)
        write_batch({f"mem-{i}": VALUE for i in range(written, end)})
        written = end
    return written, time.monotonic() - start


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
            near = client.get_map("bench-near", near_cache=True)
            put_seen = threading.Event()
            listener = near.add_entry_listener(lambda event: put_seen.set(), key="hot", include_value=False)
            near["hot"] = VALUE
            # The put's event drops "hot" from the near cache when it comes. It comes in one batch
            # with this listener's, and first (registered first): past it, a read stays cached.
            if not put_seen.wait(10):
                raise RuntimeError("the event of the near-cache map's put did not come within 10 s")
            near.remove_entry_listener(listener)
            near["hot"]  # a miss, which keeps the entry on this client
            results["near_get_us"] = _median_us(lambda i: near["hot"], counts["ops"])
            near_stats = near.stats()["near_cache"]
            results["near_hits"], results["near_misses"] = near_stats["hits"], near_stats["misses"]
            pids = [peer.popen.pid for peer in cluster.peers]
            before = sum(_rss_mb(pid) for pid in pids)
            written, seconds = _fill(data.put_all, counts["memory_entries"], counts["memory_seconds"])
            after = sum(_rss_mb(pid) for pid in pids)
            results["bytes_per_entry"] = (after - before) * 1024 * 1024 / written / 2  # two copies
            results["memory_entries"], results["memory_write_s"] = written, seconds
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
        written, seconds = _fill(client.mset, counts["memory_entries"], counts["memory_seconds"])
        results["bytes_per_entry"] = (client.info("memory")["used_memory"] - before) / written
        results["memory_entries"], results["memory_write_s"] = written, seconds
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


# -- throughput under a join and a kill ---------------------------------------------------------------


def bench_faults(counts) -> dict:
    """Acknowledged puts per FAULT_BUCKET while a member joins and another is killed; then every one read back."""
    import grid
    from sim import LocalCluster

    buckets = [0] * round(counts["fault_seconds"] / FAULT_BUCKET)
    acknowledged: list[str] = []
    errors: list[Exception] = []
    stop = threading.Event()
    results: dict = {}
    with LocalCluster(2, **FAULT_TIMING) as cluster:
        client = cluster.connect()
        try:
            data = client.get_map("bench-faults")
            for index in range(200):
                data[f"warm-{index}"] = VALUE
            start = time.monotonic()

            def write():
                index = 0
                while not stop.is_set():
                    key = f"fault-{index}"
                    index += 1
                    try:
                        data[key] = VALUE
                    except grid.GridError as exc:  # refused, so not acknowledged: counted, and on to the next
                        errors.append(exc)
                        continue
                    except Exception as exc:  # noqa: BLE001 - a bug: reported, and the writer stops
                        errors.append(exc)
                        return
                    slot = int((time.monotonic() - start) / FAULT_BUCKET)
                    if slot < len(buckets):
                        buckets[slot] += 1
                    acknowledged.append(key)

            writer = threading.Thread(target=write, name="bench-faults-writer")
            writer.start()
            try:
                time.sleep(max(0.0, start + FAULT_JOIN_AT - time.monotonic()))
                results["join_at_s"] = time.monotonic() - start
                cluster.add()
                results["join_took_s"] = time.monotonic() - start - results["join_at_s"]
                time.sleep(max(0.0, start + FAULT_KILL_AT - time.monotonic()))
                results["kill_at_s"] = time.monotonic() - start
                cluster.kill(1)
                time.sleep(max(0.0, start + counts["fault_seconds"] - time.monotonic()))
            finally:
                stop.set()
                writer.join(60)  # a put waits at most 30 s for its partition (DataUnavailable)
            if writer.is_alive():
                raise RuntimeError("the writer was still inside a put 60 s after it was told to stop")
            found = {}
            for first in range(0, len(acknowledged), BATCH):
                found.update(data.get_all(acknowledged[first:first + BATCH]))
            results["lost"] = sum(1 for key in acknowledged if found.get(key) != VALUE)
            results["members_after"] = len(client.members())
        finally:
            client.close()
    join_slot = int(results["join_at_s"] / FAULT_BUCKET)
    kill_slot = int(results["kill_at_s"] / FAULT_BUCKET)
    longest = current = 0
    longest_end = 0
    for slot, count in enumerate(buckets):
        current = current + 1 if count == 0 else 0
        if current > longest:
            longest, longest_end = current, slot + 1
    results.update(
        acknowledged=len(acknowledged), errors=len(errors), first_error=repr(errors[0]) if errors else None,
        before_per_s=sum(buckets[:join_slot]) / (join_slot * FAULT_BUCKET),
        join_min_per_s=min(buckets[join_slot:kill_slot], default=float("nan")) / FAULT_BUCKET,
        kill_min_per_s=min(buckets[kill_slot:], default=float("nan")) / FAULT_BUCKET,  # nan: add() ran past the end
        longest_zero_s=longest * FAULT_BUCKET, longest_zero_from_s=(longest_end - longest) * FAULT_BUCKET,
        failure_timeout_s=FAULT_TIMING["failure_timeout"])
    return results


# -- the report ----------------------------------------------------------------------------------------

ROWS = [  # (key, label, the key peers report it under)
    ("get_us", "sequential get (µs)", "get_us"),
    ("near_get_us", "near-cache get of a hot key (redis, managers: their plain get) (µs)", "get_us"),
    ("put_us", "sequential put, acknowledged by the backup (redis: SET + WAIT 1) (µs)", "put_us"),
    ("set_us", "sequential SET without WAIT (redis only) (µs)", "set_us"),
    ("put_all_us", f"put_all of {BATCH} keys (redis: a pipeline of SETs; managers: update) (µs)", "put_all_us"),
    ("get_all_us", f"get_all of {BATCH} keys (redis: MGET; managers: one get each) (µs)", "get_all_us"),
    ("bytes_per_entry", "memory per entry at {memory}, one copy (bytes)", "bytes_per_entry"),
]


def _memory_label(grid, counts) -> str:
    """How many entries the memory row stands for, and whether the time budget cut it short."""
    if not isinstance(grid, dict):
        return f"{counts['memory_entries']:,} entries"
    written = grid["memory_entries"]
    label = f"{written:,} entries (grid wrote them in {grid['memory_write_s']:.0f} s)"
    if written < counts["memory_entries"]:
        label = (f"{written:,} entries - grid stopped at its {counts['memory_seconds']} s budget, "
                 f"short of {counts['memory_entries']:,} -")
    return label


def _verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def print_targets(outcomes: dict) -> None:
    """The issue's three targets: near-cache get, memory at 1M entries, throughput through faults."""
    grid, redis, faults = outcomes.get("grid"), outcomes.get("redis"), outcomes.get("faults")
    print("\ntargets (the issue's)")
    if isinstance(grid, dict):
        near, memory = f"grid {grid['near_get_us']:.1f} µs", f"grid {grid['bytes_per_entry']:.0f} B"
        if isinstance(redis, dict):
            ratio = redis["get_us"] / grid["near_get_us"]
            near += f", redis GET {redis['get_us']:.1f} µs, {ratio:.1f}x: {_verdict(ratio >= TARGET_NEAR_RATIO)}"
            ratio = grid["bytes_per_entry"] / redis["bytes_per_entry"]
            memory += (f", redis {redis['bytes_per_entry']:.0f} B, {ratio:.2f}x: "
                       f"{_verdict(ratio <= TARGET_MEMORY_RATIO)}")
        else:
            near += f"; redis n/a ({redis})"
            memory += "; redis n/a"
        reads = grid["near_hits"] + grid["near_misses"]
        print(f"  near-cache get of a hot key >= {TARGET_NEAR_RATIO:g}x redis-py GET: {near} "
              f"(near-cache hits {grid['near_hits']} of {reads} reads)")
        print(f"  memory per entry at {grid['memory_entries']:,} entries <= {TARGET_MEMORY_RATIO:g}x redis's, "
              f"per copy: {memory}")
    else:
        print(f"  near-cache get, memory: n/a (grid {grid})")
    label = "  throughput under a join and a kill, never at zero longer than failure_timeout"
    if faults is None:
        print(f"{label}: skipped (full run only)")
        return
    if isinstance(faults, str):
        print(f"{label}: n/a ({faults})")
        return
    held = faults["longest_zero_s"] <= faults["failure_timeout_s"] and faults["lost"] == 0
    refused = f"{faults['errors']} refused" + (f", the first {faults['first_error']}" if faults["errors"] else "")
    print(f"{label} ({faults['failure_timeout_s']:g} s), none lost: {_verdict(held)}")
    print(f"    before the faults: {faults['before_per_s']:.0f} puts/s")
    print(f"    lowest 100 ms bucket while a member joins (from {faults['join_at_s']:.1f} s; add() took "
          f"{faults['join_took_s']:.1f} s): {faults['join_min_per_s']:.0f} puts/s")
    print(f"    lowest 100 ms bucket after member 1 is killed (from {faults['kill_at_s']:.1f} s): "
          f"{faults['kill_min_per_s']:.0f} puts/s")
    stall = (f"{faults['longest_zero_s']:.1f} s (from {faults['longest_zero_from_s']:.1f} s)" if faults["longest_zero_s"]
             else "none (no 100 ms bucket without an acknowledged put)")
    print(f"    longest run of empty buckets: {stall}; failure_timeout {faults['failure_timeout_s']:g} s")
    print(f"    {faults['acknowledged']:,} puts acknowledged, {faults['lost']} lost (read back afterwards), {refused}; "
          f"{faults['members_after']} members at the end")


def run(quick: bool, counts: dict | None = None) -> int:
    counts = {**(QUICK_COUNTS if quick else FULL_COUNTS), **(counts or {})}
    print(f"data structures, one client thread, 100-byte values ({'quick' if quick else 'full'} counts: "
          f"{counts['ops']} ops, {counts['batches']} batches, {counts['memory_entries']:,} entries for memory)")
    outcomes = {}
    for name, bench in (("grid", bench_grid), ("redis", bench_redis), ("managers", bench_managers)):
        print(f"[{name}] ...", flush=True)
        peer_counts = counts
        grid = outcomes.get("grid")
        if isinstance(grid, dict):  # as many entries as grid managed within its budget
            peer_counts = {**counts, "memory_entries": grid["memory_entries"]}
        try:
            outcomes[name] = bench(peer_counts)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            outcomes[name] = f"failed: {type(exc).__name__}: {exc}"
        print(f"[{name}] {outcomes[name]}", flush=True)
    names = list(outcomes)
    if counts["fault_seconds"] > 0:
        print("[faults] ...", flush=True)
        try:
            outcomes["faults"] = bench_faults(counts)
        except Exception as exc:  # noqa: BLE001 - reported with the targets
            outcomes["faults"] = f"failed: {type(exc).__name__}: {exc}"
        print(f"[faults] {outcomes['faults']}", flush=True)
    else:
        print("[faults] throughput under a join and a kill: skipped (full run only)")
    labels = [(key, label.format(memory=_memory_label(outcomes.get("grid"), counts)), peer_key)
              for key, label, peer_key in ROWS]
    width = max(len(label) for _, label, _ in labels) + 2
    print("\n" + "".ljust(width) + "".join(name.rjust(12) for name in names))
    for key, label, peer_key in labels:
        cells = []
        for name in names:
            outcome = outcomes[name]
            own = key if name == "grid" else peer_key
            cells.append("skipped" if isinstance(outcome, str) else
                         f"{outcome[own]:.1f}" if own in outcome else "-")
        print(label.ljust(width) + "".join(cell.rjust(12) for cell in cells))
    grid = outcomes.get("grid")
    if isinstance(grid, dict):
        print("\ngrid's ratio (>1: grid is better; peer time / grid time, peer memory / grid memory)")
        for name in names[1:]:
            peer = outcomes[name]
            if isinstance(peer, str):
                print(f"  {name}: {peer}")
                continue
            parts = [f"{key} {peer[peer_key] / grid[key]:.2f}x" + ("" if key == peer_key else f" (their {peer_key})")
                     for key, _, peer_key in ROWS if peer_key in peer and key in grid]
            if name == "redis" and "set_us" in peer:
                parts.append(f"put vs plain SET {peer['set_us'] / grid['put_us']:.2f}x")
            print(f"  vs {name}: " + ", ".join(parts))
    print_targets(outcomes)
    for name, outcome in outcomes.items():
        if isinstance(outcome, str) and outcome.startswith("failed"):
            print(f"{name} {outcome}", file=sys.stderr)
    return 0
