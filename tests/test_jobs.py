"""The legacy job queue (grid.jobs) on a sim cluster: workers on the members, results in order, a
job's error as its result, and a job whose worker was killed mid-job done by another worker."""

from __future__ import annotations

import os

import pytest

from grid import jobs

from . import executor_helpers as helpers
from .conftest import wait_for

WAIT = 30


def test_workers_on_the_members_do_the_jobs_and_give_results_in_order(local_cluster):
    cluster = local_cluster(2)
    client = cluster.connect()
    workers = jobs.spawn_workers(3, helpers.job_on_a_gate, cluster=client)
    try:
        handles = jobs.request_jobs(range(40), cluster=client)
        assert jobs.results(handles, timeout=WAIT) == [n * n for n in range(40)]
        assert {handle.id for handle in jobs.as_completed(handles, timeout=WAIT)} == {h.id for h in handles}
        failing = jobs.request_jobs(["not a number"], cluster=client)[0]
        with pytest.raises(TypeError):
            failing.result(timeout=WAIT)
        assert workers.stop(WAIT) == 41
        with pytest.raises(TimeoutError):  # (no worker left)
            jobs.request_jobs([1], cluster=client)[0].result(timeout=0.5)
        with pytest.raises(ValueError):
            jobs.spawn_workers(0, print, cluster=client)
    finally:
        workers.stop(WAIT)
        client.close()


def test_a_job_whose_worker_is_killed_goes_back_on_the_queue(local_cluster, tmp_path):
    cluster = local_cluster(2, heartbeat_interval=0.2, failure_timeout=1.5)
    client = cluster.connect()
    workers = jobs.spawn_workers(2, helpers.job_on_a_gate, cluster=client)
    gate, marker = str(tmp_path / "gate"), str(tmp_path / "marker")
    try:
        victim_handle = jobs.request_jobs([(gate, marker, 7)], cluster=client)[0]
        wait_for(lambda: os.path.exists(marker) and open(marker).read(), WAIT, "the job to start")
        pid = int(open(marker).read())
        victim = next(peer.index for peer in cluster.peers if peer.pid == pid)
        os.remove(marker)
        cluster.kill(victim)
        open(gate, "w").close()  # (the survivor does it at once when it gets it again)
        assert victim_handle.result(timeout=WAIT) == 49
        assert int(open(marker).read()) != pid, "another worker did it"
    finally:
        open(gate, "w").close()
        workers.stop(WAIT)  # (else the client's close waits for its workers' tasks, which never end)
        client.close()
