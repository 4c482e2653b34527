"""``cluster.status()`` and ``python -m grid status`` against live sim clusters: what each member is
doing, and which members did not answer."""

from __future__ import annotations

import json
import subprocess
import sys

from . import executor_helpers as helpers
from .conftest import wait_for

WAIT = 30


def grid_status(tmp_path, config: dict, *flags) -> subprocess.CompletedProcess:
    path = tmp_path / "client.json"
    path.write_text(json.dumps(config))
    return subprocess.run([sys.executable, "-m", "grid", "status", "--config", str(path), *flags],
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

        done = grid_status(tmp_path, cluster.config(), "--json")
        assert done.returncode == 0, done.stderr
        assert set(json.loads(done.stdout)["members"]) == set(status["members"])
        text = grid_status(tmp_path, cluster.config())
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
            done = grid_status(tmp_path, cluster.config(0))
            assert done.returncode == 1, done.stderr
            assert f"{frozen.uuid[:8]}  did not answer" in done.stdout and "1 did not answer" in done.stdout
        finally:
            cluster.resume(1)
    finally:
        client.close()
