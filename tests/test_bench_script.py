"""scripts/bench.py: its measures run, its tables and targets print, without timing anything here.

The measures run on a stand-in executor in this process (threads, tiny counts); what they
report is checked for shape, never for speed (speed lives in the bench itself).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import itertools
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


TINY = {
    "roundtrips": 5, "warmup": 2, "map_items": 50, "dask_map_items": 10, "chunk1_items": 10, "payloads": 3,
    "best_chunksizes": (5, 10), "warm_map_items": 5, "everywhere": 2, "loads": 1, "submits": 20,
    "cpu_tasks": 4, "cpu_n": 1000, "memory_items": (100, 300),
}


class ThreadContender:
    """A stand-in with the Contender interface: a thread pool; map is lazy, as grid's is."""

    name, label = "threads", "threads"
    has_chunksize = True

    def open(self):
        self.executor = concurrent.futures.ThreadPoolExecutor(2)
        self.opened = getattr(self, "opened", 0) + 1
        return self

    def submit(self, fn, *args):
        return self.executor.submit(fn, *args)

    def map(self, fn, iterable, chunksize=None):
        return map(fn, iterable)  # lazy: it can take itertools.count()

    def close(self):
        self.executor.shutdown(wait=True)


@pytest.fixture
def contender():
    contender = ThreadContender().open()
    yield contender
    contender.close()


def test_submit_reports_the_cost_of_the_call_and_of_the_whole(bench, contender):
    result = bench.measure_submit(contender, TINY, 1)

    assert set(result) == {"submit_us", "submit_all_us"}
    assert 0 < result["submit_us"] <= result["submit_all_us"]


def test_roundtrip_reports_the_submit_call_inside_it(bench, contender):
    result = bench.measure_roundtrip(contender, TINY, 1)

    assert set(result) == {"rt_median_us", "rt_p99_us", "rt_submit_us"}
    assert 0 < result["rt_submit_us"] <= result["rt_p99_us"]


def test_cpu_reports_wall_time_and_whose_cpu_it_took(bench, contender):
    result = bench.measure_cpu(contender, TINY, 1)

    assert set(result) == {"cpu_wall_s", "cpu_workers_s", "cpu_caller_s"}
    assert result["cpu_wall_s"] > 0 and result["cpu_caller_s"] >= 0
    assert result["cpu_workers_s"] == 0  # threads: no worker processes below this one


def test_bytes_runs_a_first_and_a_warm_pass_on_a_fresh_executor(bench):
    contender = ThreadContender()

    result = bench.measure_bytes(contender, TINY, 2)

    assert set(result) == {"bytes_first_mbs", "bytes_warm_mbs"}
    assert result["bytes_first_mbs"] > 0 and result["bytes_warm_mbs"] > 0
    assert contender.opened == 2  # one fresh executor per repetition, each closed


def test_memory_reads_rss_at_both_checkpoints_of_an_endless_map(bench, contender):
    result = bench.measure_memory(contender, TINY, 1)

    assert set(result) == {"mem_caller_1_mb", "mem_caller_2_mb", "mem_members_1_mb", "mem_members_2_mb",
                           "mem_growth_mb"}
    assert result["mem_caller_1_mb"] > 0 and result["mem_members_1_mb"] == 0
    growth = result["mem_caller_2_mb"] - result["mem_caller_1_mb"]
    assert result["mem_growth_mb"] == pytest.approx(growth)


def test_process_figures_come_from_proc(bench):
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert child.pid in bench.descendants(os.getpid())
        assert bench.rss_mb(os.getpid()) > 1
        assert set(bench.cpu_seconds([os.getpid(), child.pid])) == {os.getpid(), child.pid}
        assert bench.rss_mb(2**22 + 1) == 0.0  # a pid that does not exist
    finally:
        child.stdin.close()
        child.wait()


def test_every_measure_has_a_function_a_timeout_and_rows(bench):
    assert set(bench.MEASURES) <= set(bench.MEASURE_FUNCTIONS) <= set(bench.PHASE_TIMEOUTS)
    assert {key for key, *_ in bench.ROWS} == set(bench.KEY_MEASURE)
    assert set(bench.KEY_MEASURE.values()) <= set(bench.MEASURES)
    for counts in (bench.QUICK_COUNTS, bench.FULL_COUNTS):
        labels = bench._label_values(counts)
        assert all(label.format(**labels) for _, label, _, _ in bench.ROWS)
    assert bench._label_values(bench.QUICK_COUNTS)["memory_2"] == "2M"
    assert not bench.applicable(bench.ProcessPoolContender, "memory")  # its map is eager
    assert bench.applicable(bench.GridContender, "memory")


def outcomes_of(bench, grid_values: dict, ppe_values: dict) -> dict:
    grid, ppe = bench.Outcome("grid"), bench.Outcome("ppe")
    grid.values.update(grid_values)
    ppe.values.update(ppe_values)
    return {"grid": grid, "ppe": ppe}


def test_targets_say_met_or_missed_with_the_ratio(bench, capsys):
    grid_values = {"rt_median_us": 100.0, "submit_us": 30.0, "rt_submit_us": 20.0, "bytes_first_mbs": 300.0,
                   "bytes_warm_mbs": 600.0, "cpu_wall_s": 1.0, "cpu_workers_s": 2.0, "map_default": 3e6,
                   "map_chunk1": 5000.0, "startup_s": 0.4, "mem_growth_mb": 12.0, "mem_caller_1_mb": 100.0,
                   "mem_caller_2_mb": 110.0, "mem_members_1_mb": 80.0, "mem_members_2_mb": 82.0}
    ppe_values = {"rt_median_us": 200.0, "submit_us": 10.0, "rt_submit_us": 20.0, "bytes_first_mbs": 300.0,
                  "bytes_warm_mbs": 300.0, "cpu_wall_s": 1.0, "cpu_workers_s": 2.0, "map_best": 1e6,
                  "map_chunk1": 5000.0}

    bench.print_targets(outcomes_of(bench, grid_values, ppe_values))
    lines = capsys.readouterr().out.splitlines()

    def line(start):
        return next(text for text in lines if text.lstrip().startswith(start))

    assert "issue 10" in lines[1]
    assert "MET" in line("(a) round trip") and "0.50x" in line("(a) round trip")
    assert "MISSED" in line("(b) submit()") and "3.00x" in line("(b) submit()")
    assert "MISSED" in line("(c) 1 MB payloads, first pass")
    assert "MET" in line("(warm pass")
    assert "MET" in line("(d) CPU-bound")
    assert "MET" in line("(e) default map")
    assert "MET" in line("(f) flat memory") and "12.0 MB" in line("(f) flat memory")


def test_targets_and_report_say_what_was_not_measured(bench, capsys):
    outcomes = outcomes_of(bench, {"rt_median_us": 100.0}, {})

    bench.print_report(outcomes, bench.QUICK_COUNTS)
    bench.print_targets(outcomes)
    out = capsys.readouterr().out

    assert "n/a (PPE not measured)" in out and "n/a (grid not measured)" in out
    assert "RSS of the caller, map over count() at 200k items (grid only) (MB)" in out


def test_the_memory_measure_stops_an_endless_map(bench):
    taken = itertools.count()

    class Lazy(ThreadContender):
        def map(self, fn, iterable, chunksize=None):
            def generate():
                for item in iterable:
                    next(taken)
                    yield fn(item)
            return generate()

    contender = Lazy().open()
    try:
        bench.measure_memory(contender, TINY, 1)
    finally:
        contender.close()
    assert next(taken) == TINY["memory_items"][1]  # not one item more than the second checkpoint


def test_rounds_merge_to_the_best_throughput_and_the_median_latency(bench):
    rounds = []
    for rate, latency, chunksize in ((3.0, 300.0, 1000), (5.0, 100.0, 10000), (4.0, 200.0, 1000)):
        outcome = bench.Outcome("grid")
        outcome.values.update(map_best=rate, map_best_chunksize=chunksize, rt_median_us=latency)
        rounds.append(outcome)
    rounds[0].failures["cpu"] = "timed out"
    merged = bench.merge_rounds(rounds)
    assert merged.values["map_best"] == 5.0 and merged.values["map_best_chunksize"] == 10000, \
        "the chunksize that won comes with its rate"
    assert merged.values["rt_median_us"] == 200.0
    assert merged.failures == {}, "a measure that succeeded in another round did not fail"
    rounds[1].failures["cpu"] = rounds[2].failures["cpu"] = "timed out"
    assert bench.merge_rounds(rounds).failures == {"cpu": "timed out"}
    assert bench.parse_args(["--rounds", "3"]).rounds == 3


def test_the_data_bench_measures_grid_and_managers_and_prints_ratios(capsys, monkeypatch):
    """bench.py --data: grid's map on a sim cluster, managers' dict (and redis-server when installed)."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import bench_data
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    monkeypatch.setattr(bench_data.shutil, "which", lambda name: None)  # redis: reported as skipped
    assert bench_data.run(True, {"ops": 20, "batches": 2, "memory_entries": 2000}) == 0
    out = capsys.readouterr().out
    grid_line = next(line for line in out.splitlines() if line.startswith("[grid] {"))
    assert all(key in grid_line for key in ("get_us", "put_us", "put_all_us", "get_all_us", "bytes_per_entry"))
    assert "redis-server is not installed" in out
    assert "vs managers: get_us" in out
    near_row = next(line for line in out.splitlines() if line.startswith("near-cache get of a hot key ("))
    grid_cell = near_row.split(")")[-1].split()[0]  # the columns follow the label: grid, redis, managers
    assert float(grid_cell) > 0
    near_target = next(line for line in out.splitlines() if "near-cache get of a hot key >=" in line)
    hits = int(near_target.split("near-cache hits ")[1].split()[0])
    assert hits == 20, "the 20 timed reads of the hot key come from the near cache"
    assert "memory per entry at 2,000 entries" in out
    assert "throughput under a join and a kill: skipped (full run only)" in out
