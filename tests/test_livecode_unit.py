"""The patch log's bookkeeping, with two members in this process (fast; no subprocesses)."""

import pytest

import grid
from grid.net import serialize

from .conftest import wait_for


@pytest.fixture
def two_members(tmp_path):
    base = {"id": "livecode-unit", "join": "tcp", "members": {"path": str(tmp_path)}, "port": 0,
            "heartbeat_interval": 0.2, "failure_timeout": 2.0, "join_timeout": 0.3}
    first = grid.Peer(base).start(10)
    second = grid.Peer(base).start(10)
    try:
        wait_for(lambda: len(first.members()) == 2 and len(second.members()) == 2, 10, "two members")
        yield first, second
    finally:
        second.close()
        first.close()


def ids(peer):
    return [entry["id"] for entry in peer.code._log]


def submit(peer, source):
    from grid.code import patches

    return peer.code.submit(patches.exec_patch(source, "livecode_unit_ns", None)).result(10)


def test_every_member_holds_the_masters_log_in_order(two_members):
    master, other = two_members
    assert master.membership.is_master
    for index in range(3):
        outcomes = submit(other, f"VALUE = {index}")  # through a member that is not the master
        assert set(outcomes) == {master.uuid, other.uuid} and all(ok for ok, _ in outcomes.values())
    assert [entry["seq"] for entry in master.code._log] == [1, 2, 3]
    wait_for(lambda: ids(other) == ids(master), 5, "the other member to hold the same log")


def test_a_member_that_missed_patches_takes_the_whole_log_from_the_sender(two_members):
    master, other = two_members
    submit(master, "VALUE = 'a'")
    submit(master, "VALUE = 'b'")
    with other.code._lock:  # as if it had missed the second patch
        other.code._log = other.code._log[:1]
    stray = dict(master.code._log[-1], id="never-logged", seq=7)
    answer = master.code._request(other.me, "code.apply", (master.code._epoch, 7, [stray])).result(10)
    assert answer[0] is True and serialize.loads(answer[1]) is None
    assert ids(other) == ids(master), "the gap was filled from the master's log, the stray entry dropped"
    assert "never-logged" not in other.code._done


def test_a_retried_patch_is_logged_once(two_members):
    from grid.code import patches

    master, _ = two_members
    patch = patches.exec_patch("VALUE = 'once'", "livecode_unit_ns", None)
    master.code.submit(patch).result(10)
    master.code.submit(dict(patch)).result(10)  # the caller's retry after a lost master: same id
    assert [entry["id"] for entry in master.code._log].count(patch["id"]) == 1


def test_reset_starts_a_new_epoch_everywhere(two_members):
    master, other = two_members
    submit(master, "VALUE = 'before'")
    epoch = master.code._epoch
    assert master.code.local_request("code.reset", None).result(10) == 1
    wait_for(lambda: other.code._epoch == epoch + 1 and other.code._log == [], 5, "the other member to reset")
    outcomes = submit(master, "VALUE = 'after'")
    assert all(ok for ok, _ in outcomes.values())
    assert [entry["seq"] for entry in master.code._log] == [1]


def test_a_member_with_code_refused_keeps_the_log_but_runs_nothing(tmp_path):
    base = {"id": "livecode-refuse", "join": "tcp", "members": {"path": str(tmp_path)}, "port": 0,
            "heartbeat_interval": 0.2, "failure_timeout": 2.0, "join_timeout": 0.3}
    master = grid.Peer(base).start(10)
    refuser = grid.Peer(dict(base, allow_code=False)).start(10)
    try:
        wait_for(lambda: len(master.members()) == 2, 10, "two members")
        outcomes = submit(master, "VALUE = 'x'")
        ok, packed = outcomes[refuser.uuid]
        assert not ok and "allow_code = false" in packed[1]
        assert outcomes[master.uuid][0] is True
        assert ids(refuser) == ids(master)
    finally:
        refuser.close()
        master.close()


def test_current_member_is_none_again_once_the_member_in_this_process_closed(tmp_path):
    peer = grid.Peer({"id": "livecode-current", "join": "tcp", "members": {"path": str(tmp_path)}, "port": 0,
                      "join_timeout": 0.3}).start(10)
    try:
        assert grid.current_member() == peer.me
    finally:
        peer.close()
    assert grid.current_member() is None


def test_an_executor_reaches_its_cluster_for_code(tmp_path):
    config = {"id": "livecode-executor", "join": "tcp", "members": {"path": str(tmp_path)}, "port": 0,
              "join_timeout": 0.3}
    peer = grid.Peer(config).start(10)
    try:
        with grid.connect(config) as cluster, grid.GridExecutor(cluster=cluster) as executor:
            assert executor.cluster is cluster
            assert executor.cluster.eval_all("6 * 7") == {peer.me: 42}
    finally:
        peer.close()
