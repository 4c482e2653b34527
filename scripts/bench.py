#!/usr/bin/env python3
"""GridExecutor against its peers, side by side in one run on this machine, 2 workers each.

::

    bench.py (parent) ── for each executor, one after the other ──> bench.py --child NAME (own session)
         │   reads one JSON line per event from a pipe:                 │ opens the executor, runs the
         │   {"phase": "roundtrip"} ... {"result": {...}}               │ measures in order, reports each
         │   a phase that overruns its timeout: the child's whole       │ on the pipe, shuts it down, exits
         │   process tree is killed, the measure is reported as         └─> its workers: grid members, pool
         │   "failed: ...", a fresh child runs the measures left            processes, dask workers, ray actors
         └── prints the tables: absolute figures, grid's ratio to each peer, the targets of issue 10

Each executor runs alone (its child exits before the next one starts), so they never
compete for the cores. All traffic stays on 127.0.0.1: grid's embedded cluster is
loopback only, dask's LocalCluster binds 127.0.0.1 with no dashboards, and ray is told
to stay on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) with usage stats off.

Executors (2 workers each; a peer that is not installed is skipped, saying so):
    grid    grid.GridExecutor(max_workers=2): the embedded local cluster (GRID unset)
    ppe     concurrent.futures.ProcessPoolExecutor(2), the platform's default start method
    loky    loky.ProcessPoolExecutor(max_workers=2)
    dask    distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1)
            + Client(...).get_executor(pure=False) (pure=False: every submit is a new task,
            not a cached key)
    ray     ray.util.multiprocessing.Pool(2) on ray.init(num_cpus=2)

Measures (--quick uses smaller counts):
    startup     creating the executor until its first submit(noop) result, a fresh executor
                each time (imports excluded; for ray it includes ray.init)
    roundtrip   submit(noop).result() 1,000 times after a warm-up: median and p99, and the median
                time of the submit() call alone (an idle executor: grid sends from the caller)
    submit      submit(noop) 5,000 times without waiting (µs per call: what submit() costs the
                caller), then waiting for them all (µs per task, submit to the last result)
    cpu         200 x sum(range(10**6)), submitted at once, until the last result: wall time,
                and the CPU-seconds of the worker processes (every process below the one that
                runs the executor, from /proc) and of the calling process
    map         list(map(add_one, range(100_000))) with default arguments (items/s); dask has
                no chunking (one task per item), so it maps 5,000 items; grid also maps the
                real `lambda x: x + 1` (a grid-only row); peers with a chunksize (ppe, loky,
                ray) also try chunksize 1,000 and 10,000 and report the better; chunksize=1
                over 5,000 items (tasks/s; dask: its one-task-per-item map); and the default
                map over iter(range(...)), which grid cannot slice (it slices a range, list or
                tuple into chunks; an iterator it takes item by item): the general case
    bytes       map(identity) over 200 distinct 1 MB `bytes` with default arguments, on a fresh
                executor (its workers up, nothing large sent yet): the first pass, then a warm
                pass; MB/s counts the bytes sent one way (1 MB = 10**6 bytes)
    memory      grid only (the peers' map is eager: it cannot take an endless iterable): RSS of
                the calling process and the sum over the member processes (from /proc) once
                map(add_one, itertools.count()) has yielded 1M items and 20M items (--quick: 200k
                and 2M), and the growth between the two

Every executor maps the module-level `add_one` (ProcessPoolExecutor cannot pickle a
lambda), grid included, so the rows compare the same work. --repeat N takes the best of N
for throughputs and the median of N for latencies. --rounds R runs every contender R times,
interleaved (grid, PPE, ..., grid, PPE, ...), and takes the best (throughputs) or the median
(latencies, memory) of the rounds: this machine's speed drifts by 30% within a minute, so
contenders measured one after the other once can differ by the drift alone.

Usage:
    python scripts/bench.py                      # everything installed, full counts
    python scripts/bench.py --quick              # smaller counts, a quick look
    python scripts/bench.py --only grid --only ppe --repeat 3
    python scripts/bench.py --quick --only grid --only ppe --rounds 3   # interleaved, for ratios
    python scripts/bench.py --only grid --only ppe --measure bytes --measure map_default --measure map_best
    python scripts/bench.py --only grid --only ppe --measure map_default --measure map_iter --measure map_best
    python scripts/bench.py --data [--quick]       # DMap against redis-server and managers (bench_data.py)
    python scripts/bench.py --family [--quick]     # lock, topic, jobs, map_reduce against peers (bench_family.py)
    pip install loky 'dask[distributed]' ray     # the peers (the library does not need them)
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import platform
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

_SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_SCRIPTS_DIR)

WORKERS = 2
MB = 10**6
PAYLOAD_BYTES = 1 * MB

FULL_COUNTS = {
    "roundtrips": 1000, "warmup": 100, "map_items": 100_000, "dask_map_items": 5_000,
    "chunk1_items": 5_000, "payloads": 200, "best_chunksizes": (1000, 10000), "warm_map_items": 200,
    "everywhere": 300, "loads": 30, "submits": 5000, "cpu_tasks": 200, "cpu_n": 10**6,
    "memory_items": (1_000_000, 20_000_000),
}
QUICK_COUNTS = {
    "roundtrips": 200, "warmup": 20, "map_items": 20_000, "dask_map_items": 1_000,
    "chunk1_items": 1_000, "payloads": 50, "best_chunksizes": (1000, 10000), "warm_map_items": 100,
    "everywhere": 60, "loads": 10, "submits": 1000, "cpu_tasks": 100, "cpu_n": 10**6,
    "memory_items": (200_000, 2_000_000),
}

# Seconds one repetition of a phase may take before the child is killed and the measure failed.
PHASE_TIMEOUTS = {
    "startup": 60, "setup": 90, "roundtrip": 60, "map_default": 300, "map_iter": 300, "map_lambda": 120,
    "map_best": 180, "map_chunk1": 120, "bytes": 180, "everywhere": 120, "links": 120, "submit": 60, "cpu": 120,
    "memory": 300, "shutdown": 60, "done": 30,
}
MEASURES = ("startup", "bytes", "roundtrip", "submit", "cpu", "map_default", "map_iter", "map_lambda", "map_best", "map_chunk1",
            "everywhere", "links", "memory")
FRESH_MEASURES = ("startup", "bytes")  # each opens executors of its own, before the one the others share

# Targets of issue 10, grid against ProcessPoolExecutor (see print_targets).
TARGET_ROUNDTRIP = 0.75  # grid median at most this times PPE's
TARGET_SUBMIT = 2.0  # grid's submit() cost at most this times PPE's
TARGET_BYTES = 1.5  # grid MB/s on the first pass at least this times PPE's
TARGET_CPU = 1.05  # grid's wall time on CPU-bound tasks at most this times PPE's
TARGET_MAP_DEFAULT = 2.0  # grid default map at least this times PPE with its best chunksize
TARGET_MEMORY_MB = 50  # growth of RSS (caller + members) from the first checkpoint to the second, at most
# Earlier targets (issue 3), still reported.
TARGET_MAP_CHUNK1 = 2.0  # grid chunksize=1 at least this times PPE's chunksize=1
TARGET_STARTUP = 0.5  # seconds to the first result of an embedded 2-member cluster


# -- what the workers run (module-level: every worker process imports this module as `bench`) --------


def noop():
    return None


def add_one(x):
    return x + 1


def identity(x):
    return x


def burn(n):
    return sum(range(n))


# -- the executors, behind one small interface -----------------------------------------------------------


class Contender:
    """One executor under test: how to open it, submit, map and close it."""

    name = ""
    label = ""
    modules: tuple[str, ...] = ()
    install = ""
    has_chunksize = True  # map takes a chunksize (dask's does not)
    note = ""

    def missing(self) -> str | None:
        """The first required module that is not installed, or None."""
        for module in self.modules:
            if importlib.util.find_spec(module) is None:
                return module
        return None

    def versions(self) -> str:
        parts = []
        for module in self.modules:
            try:
                parts.append(f"{module} {importlib.import_module(module).__version__}")
            except Exception:
                parts.append(module)
        return ", ".join(parts)

    def prepare(self) -> None:
        """Imports and environment, done before any timing."""

    def open(self):
        raise NotImplementedError

    def submit(self, fn, *args):
        return self.executor.submit(fn, *args)

    def map(self, fn, iterable, chunksize=None):
        if chunksize is None:
            return self.executor.map(fn, iterable)
        return self.executor.map(fn, iterable, chunksize=chunksize)

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    run_everywhere = None  # fn() on every worker, returning one result per worker (if the peer can)
    load_file = None  # ship a .py file to every worker and import it there (if the peer can)


class GridContender(Contender):
    name, label, modules = "grid", "grid", ("grid",)
    install = "pip install -e ."

    def prepare(self) -> None:
        os.environ.pop("GRID", None)
        import grid

        config = grid.load_config()
        if config.source != "defaults":
            raise RuntimeError(f"grid would use the cluster configured by {config.source}, not the embedded "
                               f"default; run the bench from a folder without grid.toml and without "
                               f"~/.grid/grid.toml")
        self.grid = grid

    def open(self):
        self.executor = self.grid.GridExecutor(max_workers=WORKERS)
        return self

    def run_everywhere(self, fn):
        return self.executor.cluster.run_all(fn)

    def load_file(self, path):
        return self.executor.cluster.load_all(path, local=False)


class ProcessPoolContender(Contender):
    name, label, modules = "ppe", "PPE", ("concurrent.futures",)
    note = "ProcessPoolExecutor, default start method"

    def versions(self) -> str:
        import multiprocessing

        return f"stdlib, start method {multiprocessing.get_start_method()}"

    def open(self):
        import concurrent.futures

        self.executor = concurrent.futures.ProcessPoolExecutor(WORKERS)
        return self


class LokyContender(Contender):
    name, label, modules = "loky", "loky", ("loky",)
    install = "pip install loky"

    def prepare(self) -> None:
        import loky

        self.loky = loky

    def open(self):
        self.executor = self.loky.ProcessPoolExecutor(max_workers=WORKERS)
        return self


class DaskContender(Contender):
    name, label, modules = "dask", "dask", ("dask", "distributed")
    install = "pip install 'dask[distributed]'"
    has_chunksize = False

    def prepare(self) -> None:
        import logging

        import dask
        import distributed

        dask.config.set({"distributed.admin.system-monitor.interval": "500ms"})
        self.logging = logging
        self.distributed = distributed

    def open(self):
        self.cluster = self.distributed.LocalCluster(
            n_workers=WORKERS, processes=True, threads_per_worker=1, host="127.0.0.1",
            dashboard_address=None, worker_dashboard_address=None, silence_logs=self.logging.ERROR)
        try:
            self.client = self.distributed.Client(self.cluster)
        except BaseException:
            self.cluster.close()
            raise
        self.executor = self.client.get_executor(pure=False)
        return self

    def map(self, fn, iterable, chunksize=None):
        return self.executor.map(fn, iterable)  # chunksize is ignored by dask: one task per item

    def run_everywhere(self, fn):
        return self.client.run(fn)

    def load_file(self, path):
        return self.client.upload_file(path)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.client.close()
        self.cluster.close()


class _RayFuture:
    __slots__ = ("async_result",)

    def __init__(self, async_result):
        self.async_result = async_result

    def result(self, timeout=None):
        return self.async_result.get(timeout)


class RayContender(Contender):
    name, label, modules = "ray", "ray", ("ray",)
    install = "pip install ray"
    note = "ray.util.multiprocessing.Pool"

    def prepare(self) -> None:
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no phoning home
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # else ray swaps 127.0.0.1 for a public address
        import ray
        from ray.util.multiprocessing import Pool

        self.ray, self.pool_class = ray, Pool

    def open(self):
        self.ray.init(num_cpus=WORKERS, include_dashboard=False, _node_ip_address="127.0.0.1",
                      log_to_driver=False, logging_level="ERROR")
        try:
            self.pool = self.pool_class(WORKERS)
        except BaseException:
            self.ray.shutdown()
            raise
        return self

    def submit(self, fn, *args):
        return _RayFuture(self.pool.apply_async(fn, args))

    def map(self, fn, iterable, chunksize=None):
        return self.pool.map(fn, iterable, chunksize=chunksize)

    def close(self) -> None:
        self.pool.terminate()
        self.ray.shutdown()


CONTENDERS = {c.name: c for c in (GridContender, ProcessPoolContender, LokyContender, DaskContender, RayContender)}


# -- the measures (run in the child) ----------------------------------------------------------------------


def best(values):
    return max(values)


def median(values):
    return statistics.median(values)


def measure_startup(contender: Contender, counts, repeat) -> dict:
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        contender.open()
        try:
            contender.submit(noop).result()
            seconds.append(time.perf_counter() - start)
        finally:
            contender.close()
    return {"startup_s": median(seconds)}


def warm_up(contender: Contender, counts) -> None:
    for _ in range(counts["warmup"]):
        contender.submit(noop).result()
    expected = list(range(1, counts["warm_map_items"] + 1))
    if list(contender.map(add_one, range(counts["warm_map_items"]))) != expected:
        raise RuntimeError("the warm-up map returned wrong results")


def measure_roundtrip(contender: Contender, counts, repeat) -> dict:
    """submit(noop).result() one at a time; also what the submit() call alone took (on an idle executor)."""
    medians, p99s, submits = [], [], []
    for _ in range(repeat):
        for _ in range(counts["warmup"]):
            contender.submit(noop).result()
        samples, submit_samples = [], []
        for _ in range(counts["roundtrips"]):
            start = time.perf_counter_ns()
            future = contender.submit(noop)
            submitted = time.perf_counter_ns()
            future.result()
            samples.append(time.perf_counter_ns() - start)
            submit_samples.append(submitted - start)
        samples.sort()
        medians.append(statistics.median(samples) / 1000)
        p99s.append(samples[min(len(samples) - 1, math.ceil(0.99 * len(samples)) - 1)] / 1000)
        submits.append(statistics.median(submit_samples) / 1000)
    return {"rt_median_us": median(medians), "rt_p99_us": median(p99s), "rt_submit_us": median(submits)}


def _map_rate(contender: Contender, fn, items: int, chunksize, repeat, source=range) -> float:
    """Items/s of ``list(map(fn, source(items)))``: ``source`` is ``range``, or ``_an_iterator``
    (what map cannot slice: a generator, a file, a zip)."""
    expected_last = items  # fn is x + 1 over range(items)
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        results = list(contender.map(fn, source(items), chunksize=chunksize))
        elapsed = time.perf_counter() - start
        if len(results) != items or results[0] != 1 or results[-1] != expected_last:
            raise RuntimeError(f"map returned wrong results ({len(results)} items, expected {items})")
        rates.append(items / elapsed)
    return best(rates)


def default_map_items(contender: Contender, counts) -> int:
    return counts["map_items"] if contender.has_chunksize else counts["dask_map_items"]


def measure_map_default(contender: Contender, counts, repeat) -> dict:
    items = default_map_items(contender, counts)
    return {"map_default": _map_rate(contender, add_one, items, None, repeat), "map_default_items": items}


def _an_iterator(items: int):
    return iter(range(items))


def measure_map_iter(contender: Contender, counts, repeat) -> dict:
    items = default_map_items(contender, counts)
    return {"map_iter": _map_rate(contender, add_one, items, None, repeat, source=_an_iterator)}


def measure_map_lambda(contender: Contender, counts, repeat) -> dict:
    items = default_map_items(contender, counts)
    return {"map_lambda": _map_rate(contender, lambda x: x + 1, items, None, repeat)}


def measure_map_best(contender: Contender, counts, repeat) -> dict:
    rates = {size: _map_rate(contender, add_one, counts["map_items"], size, repeat)
             for size in counts["best_chunksizes"]}
    chosen = max(rates, key=rates.get)
    return {"map_best": rates[chosen], "map_best_chunksize": chosen,
            **{f"map_chunksize_{size}": rate for size, rate in rates.items()}}


def measure_map_chunk1(contender: Contender, counts, repeat) -> dict:
    chunksize = 1 if contender.has_chunksize else None
    return {"map_chunk1": _map_rate(contender, add_one, counts["chunk1_items"], chunksize, repeat)}


def measure_submit(contender: Contender, counts, repeat) -> dict:
    """What ``submit()`` costs the caller: N noops submitted without waiting; then the wait for all."""
    count = counts["submits"]
    per_call, per_task = [], []
    for _ in range(repeat):
        for _ in range(counts["warmup"]):
            contender.submit(noop).result()
        submit = contender.submit
        start = time.perf_counter_ns()
        futures = [submit(noop) for _ in range(count)]
        submitted = time.perf_counter_ns()
        for future in futures:
            future.result()
        finished = time.perf_counter_ns()
        per_call.append((submitted - start) / count / 1000)
        per_task.append((finished - start) / count / 1000)
    return {"submit_us": median(per_call), "submit_all_us": median(per_task)}


def measure_cpu(contender: Contender, counts, repeat) -> dict:
    """CPU-bound tasks submitted at once: wall time to the last result, and whose CPU it took."""
    count, n = counts["cpu_tasks"], counts["cpu_n"]
    expected = n * (n - 1) // 2
    walls, workers, callers = [], [], []
    for _ in range(repeat):
        for _ in range(counts["warmup"]):
            contender.submit(noop).result()
        before_workers, before_caller = cpu_seconds(descendants(os.getpid())), caller_cpu_seconds()
        start = time.perf_counter()
        futures = [contender.submit(burn, n) for _ in range(count)]
        if any(future.result() != expected for future in futures):
            raise RuntimeError("a CPU-bound task returned a wrong result")
        walls.append(time.perf_counter() - start)
        callers.append(caller_cpu_seconds() - before_caller)
        after_workers = cpu_seconds(descendants(os.getpid()))
        workers.append(sum(seconds - before_workers[pid] for pid, seconds in after_workers.items()
                           if pid in before_workers))
    return {"cpu_wall_s": median(walls), "cpu_workers_s": median(workers), "cpu_caller_s": median(callers)}


def measure_bytes(contender: Contender, counts, repeat) -> dict:
    """1 MB payloads on a fresh executor: its first pass (nothing large sent before), then a warm one."""
    count = counts["payloads"]
    base = os.urandom(PAYLOAD_BYTES)
    payloads = [index.to_bytes(4, "little") + base[4:] for index in range(count)]  # distinct objects
    firsts, warms = [], []
    for _ in range(repeat):
        contender.open()
        try:
            # Every worker up and the small paths warm (a pool may start its processes lazily).
            for future in [contender.submit(noop) for _ in range(4 * WORKERS)]:
                future.result()
            for rates in (firsts, warms):
                start = time.perf_counter()
                results = list(contender.map(identity, payloads))
                elapsed = time.perf_counter() - start
                if len(results) != count or any(len(r) != PAYLOAD_BYTES or r[:4] != p[:4]
                                                for r, p in zip(results, payloads)):
                    raise RuntimeError("identity over the payloads returned wrong results")
                del results
                rates.append(count * PAYLOAD_BYTES / MB / elapsed)
        finally:
            contender.close()
    return {"bytes_first_mbs": best(firsts), "bytes_warm_mbs": best(warms)}


def measure_memory(contender: Contender, counts, repeat) -> dict:
    """RSS while ``map(add_one, itertools.count())`` runs: after the first and the second checkpoint."""
    first, second = counts["memory_items"]
    caller, members = {}, {}
    results = contender.map(add_one, itertools.count())
    try:
        for index, value in enumerate(results, 1):
            if index == first or index == second:
                if value != index:
                    raise RuntimeError(f"map over itertools.count() yielded {value!r} as item {index}")
                caller[index] = rss_mb(os.getpid())
                members[index] = sum(rss_mb(pid) for pid in descendants(os.getpid()))
                if index == second:
                    break
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
    return {"mem_caller_1_mb": caller[first], "mem_caller_2_mb": caller[second],
            "mem_members_1_mb": members[first], "mem_members_2_mb": members[second],
            "mem_growth_mb": caller[second] - caller[first] + members[second] - members[first]}


# -- processes, from /proc ---------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (its children, theirs, ...), now."""
    tree = _children_of() if os.path.isdir("/proc") else {}
    found, stack = [], list(tree.get(pid, []))
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(tree.get(current, []))
    return found


def cpu_seconds(pids) -> dict[int, float]:
    """User + system CPU-seconds of each of ``pids`` that still runs (all its threads)."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[pid] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15)
    return seconds


def caller_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (10**6 bytes); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return 0.0


def measure_everywhere(contender: Contender, counts, repeat) -> dict:
    """A call on every worker (grid run_all, dask Client.run), and shipping a file to all (load_all, upload_file)."""
    calls, loads = [], []
    source = "def ping():\n    return 'pong'\n" + "\n".join(f"CONSTANT_{i} = {i}" for i in range(200)) + "\n"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "bench_shipped.py")
        with open(path, "w", encoding="utf-8") as file:
            file.write(source)
        for _ in range(repeat):
            for _ in range(counts["warmup"] // 10):
                contender.run_everywhere(noop)
            samples = []
            for _ in range(counts["everywhere"]):
                start = time.perf_counter_ns()
                answers = contender.run_everywhere(noop)
                samples.append(time.perf_counter_ns() - start)
                if len(answers) != WORKERS:
                    raise RuntimeError(f"a call on every worker answered {len(answers)} times, not {WORKERS}")
            calls.append(statistics.median(samples) / 1000)
            samples = []
            for _ in range(counts["loads"]):
                start = time.perf_counter_ns()
                contender.load_file(path)
                samples.append(time.perf_counter_ns() - start)
            loads.append(statistics.median(samples) / 1000)
    return {"everywhere_us": median(calls), "load_file_us": median(loads)}


def measure_links(contender: Contender, counts, repeat) -> dict:
    """Grid only: one link between two Transports of this process, over TCP and a Unix socket.

    A request echoed by the other side: the median round trip of a 10-byte payload and of a
    1 MB one (pickled bytes, as tasks travel). It isolates the transport (framing, the
    handshake's per-frame MAC on TCP) from the executor and the member.
    """
    from grid.net.transport import Transport

    results = {}
    payload = os.urandom(PAYLOAD_BYTES)
    with tempfile.TemporaryDirectory() as folder:
        server = Transport(cluster_id="bench", secret="bench-secret", info={"uuid": "server", "role": "member"},
                           on_frame=lambda conn, frame: conn.respond(frame.request_id, frame.payload),
                           name="grid-io-bench-server")
        client = Transport(cluster_id="bench", secret="bench-secret", info={"uuid": "client", "role": "client"},
                           name="grid-io-bench-client")
        try:
            address = server.listen("127.0.0.1", 0)
            path = server.listen_unix(os.path.join(folder, "bench.sock"))
            for label, target in (("tcp", address), ("unix", path)):
                conn = client.connect(target).result(10)
                for size_label, data, rounds in (("rt", b"0123456789", counts["roundtrips"]),
                                                 ("1mb", payload, max(20, counts["payloads"]))):
                    medians = []
                    for _ in range(repeat):
                        for _ in range(max(5, rounds // 10)):
                            conn.request(data).result(10)
                        samples = []
                        for _ in range(rounds):
                            start = time.perf_counter_ns()
                            answer = conn.request(data).result(10)
                            samples.append(time.perf_counter_ns() - start)
                        if len(answer.payload) != len(data):
                            raise RuntimeError("the echo returned a payload of another size")
                        medians.append(statistics.median(samples) / 1000)
                    results[f"link_{label}_{size_label}_us"] = median(medians)
                conn.close()
        finally:
            client.close()
            server.close()
    return results


MEASURE_FUNCTIONS = {
    "startup": measure_startup, "roundtrip": measure_roundtrip, "map_default": measure_map_default,
    "map_iter": measure_map_iter, "map_lambda": measure_map_lambda, "map_best": measure_map_best, "map_chunk1": measure_map_chunk1,
    "bytes": measure_bytes, "everywhere": measure_everywhere, "links": measure_links, "submit": measure_submit,
    "cpu": measure_cpu, "memory": measure_memory,
}


def applicable(contender_class, measure: str) -> bool:
    if measure == "everywhere":
        return contender_class.run_everywhere is not None
    if measure in ("map_lambda", "links", "memory"):
        return contender_class.name == "grid"
    if measure == "map_best":
        return contender_class.has_chunksize and contender_class.name != "grid"
    return True


def run_child(name: str, measures: list[str], counts, repeat: int, report_fd: int) -> int:
    """Child process: run ``measures`` on one executor, one JSON line per event on ``report_fd``."""

    def report(**event):
        os.write(report_fd, (json.dumps(event) + "\n").encode())

    contender = CONTENDERS[name]()
    report(phase="setup")
    try:
        contender.prepare()
    except Exception as exc:
        traceback.print_exc()
        report(setup_error=_describe(exc))
        return 1
    steady = [m for m in measures if m not in FRESH_MEASURES]
    for measure in (m for m in FRESH_MEASURES if m in measures):
        report(phase=measure)
        try:
            report(measure=measure, result=MEASURE_FUNCTIONS[measure](contender, counts, repeat))
        except Exception as exc:
            traceback.print_exc()
            report(measure=measure, error=_describe(exc))
    if not steady:
        return 0
    report(phase="setup")
    try:
        contender.open()
    except Exception as exc:
        traceback.print_exc()
        report(setup_error=_describe(exc))
        return 1
    try:
        warm_up(contender, counts)
    except Exception as exc:
        traceback.print_exc()
        report(setup_error=f"the warm-up failed: {_describe(exc)}")
        report(phase="shutdown")
        contender.close()
        return 1
    try:
        for measure in steady:
            report(phase=measure)
            try:
                report(measure=measure, result=MEASURE_FUNCTIONS[measure](contender, counts, repeat))
            except Exception as exc:
                traceback.print_exc()
                report(measure=measure, error=_describe(exc))
    finally:
        report(phase="shutdown")
        contender.close()
    report(phase="done")
    return 0


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- the parent: one child per executor, watched --------------------------------------------------------


def _children_of() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    return children


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (members and workers may have their own sessions)."""
    tree = _children_of() if os.path.isdir("/proc") else {}
    doomed, stack = [], [pid]
    while stack:
        current = stack.pop()
        doomed.append(current)
        stack.extend(tree.get(current, []))
    for victim in doomed:
        try:
            os.kill(victim, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own session and process group
    except (ProcessLookupError, PermissionError):
        pass


class Outcome:
    """What one executor produced: values by key, and failures by measure."""

    def __init__(self, name: str):
        self.name = name
        self.values: dict[str, float] = {}
        self.failures: dict[str, str] = {}
        self.skipped: str | None = None
        self.notes: list[str] = []


def merge_rounds(rounds: list[Outcome]) -> Outcome:
    """One Outcome from a contender's rounds: per key, the best throughput or the median latency.

    Keys that are no row of the report (a map's item count, the chunksize that won) come with
    the value they describe: from the round whose row value was taken, else from the first.
    """
    if len(rounds) == 1:
        return rounds[0]
    merged = Outcome(rounds[0].name)
    merged.skipped = rounds[0].skipped
    higher = {key: better for key, _, _, better in ROWS}
    companions = {"map_best": ("map_best_chunksize",), "map_default": ("map_default_items",)}
    for outcome in rounds:
        merged.failures.update(outcome.failures)
        merged.notes.extend(note for note in outcome.notes if note not in merged.notes)
        for key, value in outcome.values.items():
            merged.values.setdefault(key, value)
    for key, better in higher.items():
        having = [outcome for outcome in rounds if key in outcome.values]
        if not having:
            continue
        if better:
            chosen = max(having, key=lambda outcome: outcome.values[key])
        else:
            chosen = sorted(having, key=lambda outcome: outcome.values[key])[(len(having) - 1) // 2]
        merged.values[key] = chosen.values[key]
        for companion in companions.get(key, ()):
            if companion in chosen.values:
                merged.values[companion] = chosen.values[companion]
    if len(rounds) > 1:
        merged.failures = {measure: why for measure, why in merged.failures.items()
                           if all(measure in outcome.failures for outcome in rounds)}
    return merged


def run_contender(name: str, args, counts, log_dir: str) -> Outcome:
    outcome = Outcome(name)
    contender_class = CONTENDERS[name]
    missing = contender_class().missing()
    if missing:
        outcome.skipped = f"{missing} is not installed ({contender_class.install})"
        print(f"[{name}] skipped: {outcome.skipped}", flush=True)
        return outcome
    todo = [m for m in MEASURES if applicable(contender_class, m) and (not args.measure or m in args.measure)]
    attempt = 0
    while todo:
        attempt += 1
        log_path = os.path.join(log_dir, f"{name}-{attempt}.log")
        todo = _run_one_child(name, todo, args, outcome, log_path)
    return outcome


def _run_one_child(name: str, todo: list[str], args, outcome: Outcome, log_path: str) -> list[str]:
    """Run one child for ``todo``; returns the measures still to run in a fresh child."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_SCRIPTS_DIR, _REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    command = [sys.executable, os.path.abspath(__file__), "--child", name, "--measures", ",".join(todo),
               "--repeat", str(args.repeat), "--report-fd", str(write_fd)] + (["--quick"] if args.quick else [])
    with open(log_path, "wb") as log_file:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                 env=env, pass_fds=(write_fd,), start_new_session=True)
    os.close(write_fd)
    remaining = list(todo)
    phase, phase_started = "setup", time.monotonic()
    buffer = b""
    eof = False
    try:
        while not eof:
            if phase in MEASURE_FUNCTIONS:
                limit = (args.timeout or PHASE_TIMEOUTS[phase]) * args.repeat
            else:
                limit = PHASE_TIMEOUTS[phase]
            wait = phase_started + limit - time.monotonic()
            if wait <= 0:
                kill_tree(child.pid)
                child.wait()
                why = f"timed out: no result within {limit:.0f} s (killed; log {log_path})"
                return _abandon(name, phase, why, remaining, outcome, log_path)
            ready, _, _ = select.select([read_fd], [], [], min(wait, 1.0))
            if not ready:
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                eof = True
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                event = json.loads(line)
                if "phase" in event:
                    phase, phase_started = event["phase"], time.monotonic()
                    if phase in MEASURE_FUNCTIONS:
                        print(f"[{name}] {phase} ...", flush=True)
                elif "setup_error" in event:
                    why = f"the executor could not be set up: {event['setup_error']} (log {log_path})"
                    for measure in remaining:
                        outcome.failures[measure] = why
                    print(f"[{name}] failed: {why}", flush=True)
                    remaining = []
                elif "measure" in event:
                    measure = event["measure"]
                    if measure in remaining:
                        remaining.remove(measure)
                    if "error" in event:
                        outcome.failures[measure] = f"{event['error']} (log {log_path})"
                        print(f"[{name}] {measure} failed: {event['error']}", flush=True)
                    else:
                        outcome.values.update(event["result"])
                        print(f"[{name}] {measure}: {_brief(event['result'])}", flush=True)
        returncode = child.wait(timeout=30)
    finally:
        os.close(read_fd)
        if child.poll() is None:
            kill_tree(child.pid)
            child.wait()
    if remaining:
        why = f"the child process exited with code {returncode} during {phase} (log {log_path})"
        return _abandon(name, phase, why, remaining, outcome, log_path)
    if returncode != 0 and not outcome.failures:
        outcome.notes.append(f"child exited with code {returncode} (log {log_path})")
    return []


def _abandon(name, phase, why, remaining, outcome: Outcome, log_path) -> list[str]:
    """A child hung or died: fail the measure it was in; the rest get a fresh child."""
    print(f"[{name}] {phase} failed: {why}", flush=True)
    _print_tail(log_path)
    if phase == "shutdown":
        outcome.notes.append(f"shutdown {why}")
        return []
    if phase not in remaining:  # setting up or between measures: a fresh child would do the same
        for measure in remaining:
            outcome.failures[measure] = f"{phase} {why}"
        return []
    outcome.failures[phase] = why
    return [m for m in remaining if m != phase]


def _print_tail(log_path: str, lines: int = 12) -> None:
    try:
        with open(log_path, errors="replace") as file:
            tail = file.read().splitlines()[-lines:]
    except OSError:
        return
    for line in tail:
        print(f"    | {line}", flush=True)


def _brief(result: dict) -> str:
    return ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in result.items())


# -- the report ---------------------------------------------------------------------------------------------

# (key, label, unit, higher is better); labels are formatted with ``_label_values(counts)``
ROWS = [
    ("rt_median_us", "round trip, median", "µs", False),
    ("rt_p99_us", "round trip, p99", "µs", False),
    ("rt_submit_us", "submit() on an idle executor (inside the round trip), median", "µs", False),
    ("submit_us", "submit() alone, per call ({submits} noops)", "µs", False),
    ("submit_all_us", "submit() {submits} noops, then wait for all, per task", "µs", False),
    ("cpu_wall_s", "CPU-bound {cpu_tasks} x sum(range({cpu_n})), wall", "s", False),
    ("cpu_workers_s", "CPU-bound, CPU-seconds of the worker processes", "s", False),
    ("cpu_caller_s", "CPU-bound, CPU-seconds of the calling process", "s", False),
    ("map_default", "map add_one, default args", "items/s", True),
    ("map_iter", "map add_one over an iterator (not a range), default args", "items/s", True),
    ("map_lambda", "map lambda, default args (grid only)", "items/s", True),
    ("map_best", "map add_one, best chunksize", "items/s", True),
    ("map_chunk1", "map add_one, chunksize=1", "tasks/s", True),
    ("bytes_first_mbs", "identity over 1 MB bytes, first pass (fresh executor)", "MB/s", True),
    ("bytes_warm_mbs", "identity over 1 MB bytes, warm pass", "MB/s", True),
    ("startup_s", "startup to first result", "s", False),
    ("everywhere_us", "call on every worker (run_all / Client.run)", "µs", False),
    ("load_file_us", "ship a .py to every worker (load_all / upload_file)", "µs", False),
    ("link_tcp_rt_us", "link round trip, TCP, 10 B (grid only)", "µs", False),
    ("link_tcp_1mb_us", "link round trip, TCP, 1 MB each way (grid only)", "µs", False),
    ("link_unix_rt_us", "link round trip, Unix socket, 10 B (grid only)", "µs", False),
    ("link_unix_1mb_us", "link round trip, Unix socket, 1 MB each way (grid only)", "µs", False),
    ("mem_caller_1_mb", "RSS of the caller, map over count() at {memory_1} items (grid only)", "MB", False),
    ("mem_caller_2_mb", "RSS of the caller, at {memory_2} items (grid only)", "MB", False),
    ("mem_members_1_mb", "RSS of the members (sum), at {memory_1} items (grid only)", "MB", False),
    ("mem_members_2_mb", "RSS of the members (sum), at {memory_2} items (grid only)", "MB", False),
    ("mem_growth_mb", "RSS growth {memory_1} -> {memory_2} items, caller + members (grid only)", "MB", False),
]
KEY_MEASURE = {"rt_median_us": "roundtrip", "rt_p99_us": "roundtrip", "map_default": "map_default",
               "map_iter": "map_iter",
               "map_lambda": "map_lambda", "map_best": "map_best", "map_chunk1": "map_chunk1",
               "bytes_first_mbs": "bytes", "bytes_warm_mbs": "bytes", "startup_s": "startup",
               "everywhere_us": "everywhere", "load_file_us": "everywhere", "link_tcp_rt_us": "links",
               "link_tcp_1mb_us": "links", "link_unix_rt_us": "links", "link_unix_1mb_us": "links",
               "submit_us": "submit", "submit_all_us": "submit", "rt_submit_us": "roundtrip", "cpu_wall_s": "cpu", "cpu_workers_s": "cpu",
               "cpu_caller_s": "cpu", "mem_caller_1_mb": "memory", "mem_caller_2_mb": "memory",
               "mem_members_1_mb": "memory", "mem_members_2_mb": "memory", "mem_growth_mb": "memory"}
GRID_ONLY_KEYS = frozenset({"map_lambda", "mem_caller_1_mb", "mem_caller_2_mb", "mem_members_1_mb",
                            "mem_members_2_mb", "mem_growth_mb"})


def _label_values(counts) -> dict:
    def items(count: int) -> str:
        return f"{count // 10**6}M" if count % 10**6 == 0 else f"{count // 1000}k"

    return {"submits": f"{counts['submits']:,}", "cpu_tasks": counts["cpu_tasks"],
            "cpu_n": f"10**{round(math.log10(counts['cpu_n']))}", "memory_1": items(counts["memory_items"][0]),
            "memory_2": items(counts["memory_items"][1])}


def _number(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:.1f}k"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _cell(outcome: Outcome, key: str, counts) -> str:
    if outcome.skipped:
        return "skipped"
    if key in outcome.values:
        text = _number(outcome.values[key])
        if key == "map_best":
            text += f" @{outcome.values['map_best_chunksize']}"
        if key == "map_default" and outcome.values.get("map_default_items", counts["map_items"]) != counts["map_items"]:
            text += f" ({outcome.values['map_default_items']:,}*)"
        return text
    measure = KEY_MEASURE[key]
    if measure in outcome.failures:
        return "failed"
    if not applicable(CONTENDERS[outcome.name], measure):
        return "-"
    return "?"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(text.ljust(widths[i]) if i == 0 else text.rjust(widths[i]) for i, text in enumerate(row))
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _ratio(grid_value: float, peer_value: float, higher_is_better: bool) -> float:
    return grid_value / peer_value if higher_is_better else peer_value / grid_value


def _comparisons(labels: dict) -> list[tuple]:
    """``[(grid key, label, peer key, higher is better)]``: the rows of grid's ratio to each peer."""
    comparisons = [(key, label.format(**labels), key, higher) for key, label, _, higher in ROWS
                   if key not in GRID_ONLY_KEYS and key != "map_best" and not key.startswith("link_")]
    at = next(i for i, row in enumerate(comparisons) if row[0] == "map_default") + 1
    comparisons.insert(at, ("map_default", "grid default map vs peer best chunksize", "map_best", True))
    comparisons.insert(at + 1, ("map_lambda", "grid lambda map vs peer add_one default", "map_default", True))
    at = next(i for i, row in enumerate(comparisons) if row[0] == "map_iter") + 1
    comparisons.insert(at, ("map_iter", "grid default map over an iterator vs peer best chunksize", "map_best", True))
    return comparisons


def write_plot(path: str, outcomes: dict[str, Outcome], counts) -> None:
    """An SVG of grid's ratio to each peer, a bar per measure and peer on a log scale (>1: grid is better)."""
    import math
    from xml.sax.saxutils import escape

    grid = outcomes.get("grid")
    peers = [name for name in outcomes if name != "grid" and not outcomes[name].skipped]
    if grid is None or grid.skipped or not peers:
        print(f"no plot: grid and a peer are needed ({path} not written)")
        return
    rows = []
    for grid_key, label, peer_key, higher in _comparisons(_label_values(counts)):
        ratios = [(name, _ratio(grid.values[grid_key], outcomes[name].values[peer_key], higher))
                  for name in peers if grid_key in grid.values and peer_key in outcomes[name].values]
        if ratios:
            rows.append((label, ratios))
    colors = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1"]
    left, bar, gap, width, span = 430, 9, 8, 420, 3.0  # span: log10 decades shown each side... of 1x
    height = 60 + sum(len(ratios) * bar + gap for _, ratios in rows) + 40
    one = left + width / 2
    scale = lambda ratio: one + max(-1.0, min(1.0, math.log10(ratio) / span)) * width / 2  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 40}" height="{height}" '
             'font-family="sans-serif" font-size="11">',
             f'<text x="10" y="20" font-size="14">grid against its peers on this machine (ratio, log scale; '
             f'right of 1x: grid is better)</text>']
    for exponent in range(-3, 4):
        x = scale(10 ** exponent)
        parts.append(f'<line x1="{x:.1f}" y1="40" x2="{x:.1f}" y2="{height - 30}" stroke="#ddd"/>'
                     f'<text x="{x:.1f}" y="{height - 15}" text-anchor="middle">{10 ** exponent:g}x</text>')
    parts.append(f'<line x1="{one}" y1="40" x2="{one}" y2="{height - 30}" stroke="#888"/>')
    y = 50
    for label, ratios in rows:
        parts.append(f'<text x="{left - 8}" y="{y + len(ratios) * bar / 2 + 4:.1f}" text-anchor="end">'
                     f'{escape(label[:70])}</text>')
        for name, ratio in ratios:
            x = scale(ratio)
            color = colors[peers.index(name) % len(colors)]
            parts.append(f'<rect x="{min(x, one):.1f}" y="{y}" width="{abs(x - one):.1f}" height="{bar - 1}" '
                         f'fill="{color}"><title>{escape(CONTENDERS[name].label)}: {ratio:.2f}x</title></rect>')
            y += bar
        y += gap
    for index, name in enumerate(peers):
        parts.append(f'<rect x="{left + index * 110}" y="28" width="10" height="10" fill="{colors[index % len(colors)]}"/>'
                     f'<text x="{left + index * 110 + 14}" y="37">vs {escape(CONTENDERS[name].label)}</text>')
    parts.append("</svg>")
    with open(path, "w", encoding="utf-8") as out:
        out.write("\n".join(parts) + "\n")
    print(f"wrote the plot to {path}")


def print_report(outcomes: dict[str, Outcome], counts) -> None:
    names = list(outcomes)
    print("\nAbsolute figures (2 workers each)")
    labels = _label_values(counts)
    rows = [[f"{label.format(**labels)} ({unit})"] + [_cell(outcomes[name], key, counts) for name in names]
            for key, label, unit, _ in ROWS]
    print(_table(["measure"] + [CONTENDERS[name].label for name in names], rows))
    print(f"  map rows: {counts['map_items']:,} items; chunksize=1: {counts['chunk1_items']:,} items; "
          f"bytes: {counts['payloads']} distinct 1 MB objects; @N: the better of chunksize "
          f"{' and '.join(f'{s:,}' for s in counts['best_chunksizes'])}")
    if "dask" in outcomes and not outcomes["dask"].skipped:
        print(f"  * dask has no chunksize (one task per item): its default map maps {counts['dask_map_items']:,} items "
              f"and its chunksize=1 row is the same map")
    print("  grid maps the same module-level add_one as the peers; the lambda row is grid mapping `lambda x: x + 1`")
    for outcome in outcomes.values():
        for measure, why in outcome.failures.items():
            print(f"  {CONTENDERS[outcome.name].label} {measure} failed: {why}")
        for note in outcome.notes:
            print(f"  {CONTENDERS[outcome.name].label}: {note}")

    grid = outcomes.get("grid")
    peers = [name for name in names if name != "grid"]
    if grid is None or grid.skipped or not peers:
        return
    print("\nGrid's ratio to each peer: >1 means grid is better (latencies and startup are inverted: peer / grid)")
    ratio_rows = []
    for grid_key, label, peer_key, higher in _comparisons(labels):
        row = [label]
        for name in peers:
            peer = outcomes[name]
            if grid_key in grid.values and peer_key in peer.values:
                row.append(f"{_ratio(grid.values[grid_key], peer.values[peer_key], higher):.2f}x")
            elif peer.skipped:
                row.append("skipped")
            else:
                row.append("-")
        ratio_rows.append(row)
    print(_table(["grid vs"] + [CONTENDERS[name].label for name in peers], ratio_rows))


def print_targets(outcomes: dict[str, Outcome]) -> None:
    print("\nTargets (issue 10: grid against ProcessPoolExecutor on this machine)")
    grid = outcomes.get("grid")
    ppe = outcomes.get("ppe")
    g = grid.values if grid and not grid.skipped else {}
    p = ppe.values if ppe and not ppe.skipped else {}

    def relative(grid_key, ppe_key, factor, higher, unit):
        if grid_key not in g or ppe_key not in p:
            missing = "grid" if grid_key not in g else "PPE"
            return print(f"n/a ({missing} not measured)")
        grid_value, ppe_value = g[grid_key], p[ppe_key]
        goal = factor * ppe_value
        if higher:
            met, need = grid_value >= goal, goal / grid_value
            where = f"grid {_number(grid_value)} {unit}, PPE {_number(ppe_value)}, goal >= {_number(goal)}"
            achieved = f"grid = {grid_value / ppe_value:.2f}x PPE"
        else:
            met, need = grid_value <= goal, grid_value / goal
            where = f"grid {_number(grid_value)} {unit}, PPE {_number(ppe_value)}, goal <= {_number(goal)}"
            achieved = f"grid = {grid_value / ppe_value:.2f}x PPE's time"
        if met:
            verdict = f"MET, {(1 / need - 1) * 100:.0f}% to spare"
        elif higher:
            verdict = f"MISSED: grid reaches {100 / need:.0f}% of the goal (needs {need:.2f}x more)"
        else:
            verdict = f"MISSED: grid is {(need - 1) * 100:.0f}% over the goal (needs {need:.2f}x less)"
        print(f"{verdict}; {achieved}; {where}")

    print(f"  (a) round trip median <= {TARGET_ROUNDTRIP} x PPE's", end=": ")
    relative("rt_median_us", "rt_median_us", TARGET_ROUNDTRIP, False, "µs")
    print(f"  (b) submit() cost <= {TARGET_SUBMIT} x PPE's", end=": ")
    relative("submit_us", "submit_us", TARGET_SUBMIT, False, "µs")
    print(f"      (submit() on an idle executor, for reference, <= {TARGET_SUBMIT} x PPE's)", end=": ")
    relative("rt_submit_us", "rt_submit_us", TARGET_SUBMIT, False, "µs")
    print(f"  (c) 1 MB payloads, first pass >= {TARGET_BYTES} x PPE MB/s", end=": ")
    relative("bytes_first_mbs", "bytes_first_mbs", TARGET_BYTES, True, "MB/s")
    print(f"      (warm pass, for reference, >= {TARGET_BYTES} x PPE)", end=": ")
    relative("bytes_warm_mbs", "bytes_warm_mbs", TARGET_BYTES, True, "MB/s")
    print(f"  (d) CPU-bound wall time <= {TARGET_CPU} x PPE's", end=": ")
    relative("cpu_wall_s", "cpu_wall_s", TARGET_CPU, False, "s")
    print(f"      (worker CPU-seconds, for reference, <= {TARGET_CPU} x PPE's)", end=": ")
    relative("cpu_workers_s", "cpu_workers_s", TARGET_CPU, False, "s")
    print(f"  (e) default map >= {TARGET_MAP_DEFAULT} x PPE best chunksize", end=": ")
    relative("map_default", "map_best", TARGET_MAP_DEFAULT, True, "items/s")
    print(f"  (f) flat memory: RSS growth (caller + members) <= {TARGET_MEMORY_MB} MB", end=": ")
    if "mem_growth_mb" in g:
        growth = g["mem_growth_mb"]
        verdict = "MET" if growth <= TARGET_MEMORY_MB else f"MISSED by {growth - TARGET_MEMORY_MB:.1f} MB"
        print(f"{verdict}; grid grew {growth:.1f} MB (caller {g['mem_caller_1_mb']:.1f} -> "
              f"{g['mem_caller_2_mb']:.1f} MB, members {g['mem_members_1_mb']:.1f} -> {g['mem_members_2_mb']:.1f} MB)")
    else:
        print("n/a (grid not measured)")
    print("Earlier targets (issue 3)")
    print(f"  chunksize=1 >= {TARGET_MAP_CHUNK1} x PPE chunksize=1", end=": ")
    relative("map_chunk1", "map_chunk1", TARGET_MAP_CHUNK1, True, "tasks/s")
    if "startup_s" in g:
        seconds = g["startup_s"]
        if seconds < TARGET_STARTUP:
            verdict = f"MET, {(1 - seconds / TARGET_STARTUP) * 100:.0f}% to spare"
        else:
            verdict = f"MISSED: {(seconds / TARGET_STARTUP - 1) * 100:.0f}% over ({seconds - TARGET_STARTUP:.3f} s)"
        print(f"  grid startup < {TARGET_STARTUP} s: {verdict}; grid {seconds:.3f} s")
    else:
        print(f"  grid startup < {TARGET_STARTUP} s: n/a (grid not measured)")


def print_environment(names: list[str], args, counts) -> None:
    print(f"bench: python {platform.python_version()} on {platform.system()} {platform.machine()}, "
          f"{os.cpu_count()} cores, {WORKERS} workers each, repeat {args.repeat}"
          f"{' (best for throughput, median for latency)' if args.repeat > 1 else ''}, "
          f"{'quick' if args.quick else 'full'} counts")
    try:
        commit = subprocess.run(["git", "-C", _REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    for name in names:
        contender = CONTENDERS[name]()
        if contender.missing():
            continue
        version = contender.versions() if name != "grid" else f"grid {_grid_version()} (commit {commit or '?'})"
        print(f"  {contender.label}: {version}{f'; {contender.note}' if contender.note else ''}")


def _grid_version() -> str:
    try:
        return importlib.import_module("grid").__version__
    except Exception:
        return "?"


# -- command line ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="GridExecutor against its peers, 2 workers each.")
    parser.add_argument("--only", action="append", choices=list(CONTENDERS), metavar="NAME",
                        help=f"run only this executor (repeatable): {', '.join(CONTENDERS)}")
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument("--measure", action="append", choices=list(MEASURES), metavar="NAME",
                        help=f"run only this measure (repeatable): {', '.join(MEASURES)}")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="best of N for throughput, median of N for latency (default 1)")
    parser.add_argument("--rounds", type=int, default=1, metavar="R",
                        help="run all contenders R times, interleaved; best (throughput) or median of the rounds")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="seconds one repetition of a measure may take before it is failed (default: per measure)")
    parser.add_argument("--data", action="store_true",
                        help="the data structures instead: grid's map against redis-server and managers")
    parser.add_argument("--plot", metavar="FILE.svg",
                        help="also write grid's ratio to each peer as an SVG bar chart (the README's picture)")
    parser.add_argument("--family", action="store_true",
                        help="issue 12's structures instead: lock, topic, job queue and map_reduce against their peers")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--measures", help=argparse.SUPPRESS)
    parser.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be 1 or more")
    if args.rounds < 1:
        parser.error("--rounds must be 1 or more")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    counts = QUICK_COUNTS if args.quick else FULL_COUNTS
    if args.child:
        return run_child(args.child, args.measures.split(","), counts, args.repeat, args.report_fd)
    if args.data:
        import bench_data

        return bench_data.run(args.quick)
    if args.family:
        import bench_family

        return bench_family.run(args.quick)
    names = [name for name in CONTENDERS if not args.only or name in args.only]
    print_environment(names, args, counts)
    log_dir = tempfile.mkdtemp(prefix="grid-bench-")
    rounds: dict[str, list[Outcome]] = {}
    try:
        for number in range(args.rounds):
            if args.rounds > 1:
                print(f"round {number + 1} of {args.rounds}")
            for name in names:
                rounds.setdefault(name, []).append(run_contender(name, args, counts, log_dir))
    except KeyboardInterrupt:
        print("\ninterrupted; the figures so far:")
    outcomes = {name: merge_rounds(done) for name, done in rounds.items()}
    print_report(outcomes, counts)
    print_targets(outcomes)
    if args.plot:
        write_plot(args.plot, outcomes, counts)
    failed = any(o.failures or o.notes for o in outcomes.values())
    if failed:
        print(f"\nchild logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    # Run as the module `bench`, so that the functions the workers run are `bench.noop` etc.,
    # importable in every worker process (the children get this folder on PYTHONPATH).
    if _SCRIPTS_DIR not in sys.path:
        sys.path.insert(0, _SCRIPTS_DIR)
    if _REPO_ROOT not in sys.path:
        sys.path.insert(1, _REPO_ROOT)
    import bench

    sys.exit(bench.main())
