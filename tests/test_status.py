"""``python -m grid status``, ``logs`` and ``stop`` (and ``cluster.status()``) against live sim clusters:
what each member is doing, which did not answer, their log lines, and a clean leave."""

from __future__ import annotations

import json
import subprocess
import sys

from . import executor_helpers as helpers
from .conftest import wait_for

WAIT = 30


def grid_command(tmp_path, config: dict, *words) -> subprocess.CompletedProcess:
    """``python -m grid WORDS[0] --config <config as a file> WORDS[1:]``."""
    path = tmp_path / "client.json"
    path.write_text(json.dumps(config))
    return subprocess.run([sys.executable, "-m", "grid", words[0], "--config", str(path), *words[1:]],
                          capture_output=True, text=True, timeout=60)


def test_status_says_what_each_member_holds_and_runs(local_cluster, tmp_path):
    cluster = local_cluster(2)
    client = cluster.connect()
    try:
        data = client.get_map("orders")
        data.update({n: n for n in range(100)})
        client.get_queue("work").put("job")
        client.exec_all("x = 1")
        wait_for(client.is_safe, WAIT)
        assert client.executor().submit(helpers.square, 3).result(WAIT) == 9
        status = client.status(timeout=5)
        assert set(status["members"]) == {peer.uuid for peer in cluster.peers}
        assert status["master"] == client.members()[0].uuid and status["is_safe"] is True
        members = status["members"].values()
        assert sorted(m["role"] for m in members) == ["master", "member"]
        assert sum(m["partitions"]["owned"] for m in members) == client.partitions().partitions
        assert sum(m["partitions"]["backups"] for m in members) == client.partitions().partitions
        assert sum(m["structures"].get("orders", {}).get("size", 0) for m in members) == 100
        assert sum(m["structures"].get("work", {}).get("size", 0) for m in members) == 1
        assert all(m["patches"] == 1 and m["data"] and m["uptime"] > 0 for m in members)
        assert sum(m["tasks"]["done"] for m in members) >= 1
        assert all(m["members_version"] == status["members_version"] for m in members)

        done = grid_command(tmp_path, cluster.config(), "status", "--json")
        assert done.returncode == 0, done.stderr
        assert set(json.loads(done.stdout)["members"]) == set(status["members"])
        text = grid_command(tmp_path, cluster.config(), "status")
        assert text.returncode == 0, text.stderr
        assert "orders (map," in text.stdout and "is_safe True" in text.stdout and "master" in text.stdout
    finally:
        client.close()


def test_status_names_a_member_that_does_not_answer(local_cluster, tmp_path):
    cluster = local_cluster(2)
    client = cluster.connect()
    try:
        frozen = cluster.peers[1]
        cluster.pause(1)
        try:
            status = client.status(timeout=1)
            assert isinstance(status["members"][cluster.peers[0].uuid], dict)
            assert status["members"][frozen.uuid].startswith("error")
            done = grid_command(tmp_path, cluster.config(0), "status")
            assert done.returncode == 1, done.stderr
            assert f"{frozen.uuid[:8]}  did not answer" in done.stdout and "1 did not answer" in done.stdout
        finally:
            cluster.resume(1)
    finally:
        client.close()


def test_logs_merges_the_members_recent_lines_and_picks_one_member(local_cluster, tmp_path):
    cluster = local_cluster(2)
    client = cluster.connect()
    try:
        client.exec_all("import logging, os\nlogging.getLogger('grid.test').warning('hello from pid %d', os.getpid())")
        done = grid_command(tmp_path, cluster.config(), "logs", "--level", "WARNING", "--lines", "20")
        assert done.returncode == 0, done.stderr
        for peer in cluster.peers:
            assert f"{peer.address_text} WARNING grid.test: hello from pid {peer.pid}" in done.stdout
        only = grid_command(tmp_path, cluster.config(), "logs", cluster.peers[1].uuid[:8], "--level", "WARNING")
        assert f"hello from pid {cluster.peers[1].pid}" in only.stdout
        assert cluster.peers[0].address_text not in only.stdout
        quiet = grid_command(tmp_path, cluster.config(), "logs", "--level", "CRITICAL")
        assert quiet.returncode == 0 and "hello" not in quiet.stdout
        nobody = grid_command(tmp_path, cluster.config(), "logs", "10.9.9.9:1")
        assert nobody.returncode == 2 and "no member is '10.9.9.9:1'" in nobody.stderr
        assert cluster.peers[0].address_text in nobody.stderr
    finally:
        client.close()


def test_stop_makes_a_member_leave_cleanly_and_all_stops_every_one(local_cluster, tmp_path):
    cluster = local_cluster(3)
    client = cluster.connect()
    try:
        leaving = cluster.peers[2]
        done = grid_command(tmp_path, cluster.config(), "stop", leaving.address_text)
        assert done.returncode == 0, done.stderr
        assert f"{leaving.address_text} ({leaving.uuid[:8]}) left the cluster" in done.stdout
        wait_for(lambda: leaving.popen.poll() is not None, WAIT, "the stopped member to exit")
        assert leaving.popen.returncode == 0
        assert leaving.uuid not in {m.uuid for m in client.members()}
        refused = grid_command(tmp_path, cluster.config(), "stop")
        assert refused.returncode == 2 and "MEMBER or --all" in refused.stderr
    finally:
        client.close()
    everyone = grid_command(tmp_path, cluster.config(0), "stop", "--all")
    assert everyone.returncode == 0, everyone.stderr
    wait_for(lambda: all(peer.popen.poll() is not None for peer in cluster.peers), WAIT, "every member to exit")


def test_metrics_only_grow_and_are_plausible(local_cluster):
    cluster = local_cluster(2)
    client = cluster.connect()
    try:
        executor = client.executor()
        data = client.get_map("counted")

        def metrics():
            return {uuid: m["metrics"] for uuid, m in client.status(timeout=5)["members"].items()}

        before = metrics()
        futures = [executor.submit(helpers.simulated_work, n, 0.05) for n in range(8)]
        assert [f.result(WAIT) for f in futures] == list(range(8))
        data.update({n: n for n in range(20)})
        after = metrics()
        for uuid in before:
            for counter in ("tasks_done", "bytes_in", "bytes_out", "snapshots_sent", "snapshots_received"):
                assert after[uuid][counter] >= before[uuid][counter], counter
        assert sum(m["tasks_done"] for m in after.values()) - sum(m["tasks_done"] for m in before.values()) == 8
        assert sum(m["data_ops"].get("map", 0) for m in after.values()) >= 20
        assert sum(m["data_ops_by_structure"].get("map counted", 0) for m in after.values()) >= 20
        assert all(m["bytes_in"] > 0 and m["bytes_out"] > 0 for m in after.values())
        ran = [m["task_seconds"] for m in after.values() if m["task_seconds"]["p50"] is not None]
        assert ran and all(0.05 <= t["p50"] <= t["p90"] <= t["p99"] < 5 for t in ran)
        wait_for(lambda: all(m["tasks_per_s"] is not None and m["tasks_per_s"] >= 0 for m in metrics().values()),
                 WAIT, "a rate over a second of samples")
        peers = {peer.uuid[:8] for peer in cluster.peers}
        wait_for(lambda: all(set(m["heartbeat_rtt_ms"]) == peers - {uuid[:8]} for uuid, m in metrics().items()),
                 WAIT, "each member to have timed a heartbeat round trip to the other")
        assert all(0 < rtt < 5000 for m in metrics().values() for rtt in m["heartbeat_rtt_ms"].values())
    finally:
        client.close()
