"""Members under faults, on real member processes: a task that turns slow, malformed frames
from an authenticated peer, poison tasks that kill their members, Ctrl-C at exit.

Each test reproduces a finding of issue 9 and failed before its fix, except the "exit" case
of the Ctrl-C test (a guard) and the task_processes test (a new option).
"""

from __future__ import annotations

import ast
import os
import queue
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import grid
from grid.errors import BrokenGrid, GridError, WorkerCrashed
from grid.net import messaging, serialize
from grid.net.transport import Transport

from . import fault_helpers as helpers
from .conftest import wait_for

RESULT_TIMEOUT = 30  # seconds; a hang fails the test instead of blocking the run


# -- the IO thread never runs user code --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_task_that_turns_slow_removes_nobody_and_finishes(local_cluster):
    """Quick five times, then slower than failure_timeout: it used to run on the member's IO
    thread, which stopped its heartbeats, so members were removed and the task failed."""
    cluster = local_cluster(2, heartbeat_interval=0.2, failure_timeout=1.0)
    with grid.connect(cluster.config()) as client:
        executor = grid.GridExecutor(cluster=client)
        try:
            members = client.members()
            events = []
            client.add_membership_listener(events.append)
            pids = {}
            for member in members:
                for _ in range(8):  # one at a time, nothing queued: what the quick path wanted
                    pids[member.uuid] = executor.submit_to_member(member, helpers.quick_then_slow, 8, 0).result(
                        RESULT_TIMEOUT)
            slow = {member.uuid: executor.submit_to_member(member, helpers.quick_then_slow, 8, 2.5)
                    for member in members}
            assert {uuid: future.result(RESULT_TIMEOUT) for uuid, future in slow.items()} == pids
            assert events == [], "nobody was removed"
            assert [m.uuid for m in client.members()] == [m.uuid for m in members]
        finally:
            executor.shutdown(wait=True)
    for index in range(2):
        assert "removing" not in cluster.log(index).lower()


# -- bad input from an authenticated peer ----------------------------------------------------------------------


class RawLink:
    """An authenticated link to one member, as an executor makes, that sends whatever it is told."""

    def __init__(self, config: dict, address):
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.closed: queue.SimpleQueue = queue.SimpleQueue()
        router = messaging.Router()
        router.register("results", lambda conn, results: self.results.put(results))
        self.transport = Transport(cluster_id=config["id"], secret=config["secret"], info={"role": "executor"},
                                   on_frame=router.on_frame, on_close=self.closed.put, handshake_timeout=5,
                                   name="grid-io-test")
        self.address = address

    def connect(self):
        return self.transport.connect(self.address).result(RESULT_TIMEOUT)

    def close(self):
        self.transport.close()


@pytest.fixture
def one_member(local_cluster):
    """A cluster of one member (two task threads), a raw link maker and an executor on it."""
    cluster = local_cluster(1, workers=2)
    client = grid.connect(cluster.config())
    executor = grid.GridExecutor(cluster=client)
    raw = RawLink(cluster.config(), client.members()[0].address)
    try:
        yield cluster, raw, executor
    finally:
        raw.close()
        executor.shutdown(wait=True)
        client.close()


def still_works(executor):
    """Both task threads of the member still run tasks (each of these waits for the other)."""
    futures = [executor.submit(helpers.quick_then_slow, 10**9, 0) for _ in range(20)]
    assert all(isinstance(f.result(RESULT_TIMEOUT), int) for f in futures)
    assert len(executor.members()) == 1


def test_task_arguments_are_unpickled_on_a_task_thread_not_the_io_thread(one_member):
    """Unpickling an argument runs its class's code (``__setstate__``, an import): user code,
    which must not run on the member's IO thread, where it would hold up heartbeats."""
    cluster, raw, executor = one_member
    assert executor.submit(helpers.unpickled_on, helpers.ThreadProbe()).result(RESULT_TIMEOUT).startswith("grid-task")
    threads = list(executor.map(helpers.unpickled_on, [helpers.ThreadProbe() for _ in range(5)]))
    assert threads and all(name.startswith("grid-task") for name in threads), threads


def test_malformed_tasks_fail_with_an_error_and_the_task_threads_live_on(one_member):
    """`("tasks", ([], [], [(i, 99, 0)] * 4))` used to raise in the task threads, killing both:
    the member stayed listed and heartbeating, and every later task hung."""
    cluster, raw, executor = one_member
    conn = raw.connect()
    packed = grid.compute.protocol.pack_arguments
    bad = [(1, 99, 0)] * 4 + [(2, 99, 42, *packed((), {})), (3, 99, 0, *packed(None, None)),
                              (4, 99, 0, *packed((), {1: 2})), (5, 99, 0, *packed((), {}))]
    messaging.send(conn, "tasks", ([], [], bad))
    messaging.send(conn, "tasks", (["not an id", [1]], [("no id", b""), None], []))
    messaging.send(conn, "cancel", None)
    messaging.send(conn, "cancel", [[1], {}])
    failed, count = {}, 0
    while count < len(bad):
        for task_id, status, value, _ in raw.results.get(timeout=RESULT_TIMEOUT):
            assert status == grid.compute.protocol.FAILED
            failed.setdefault(task_id, []).append(str(serialize.unpack_error(value)))
            count += 1
    assert sorted(failed) == [1, 2, 3, 4, 5]
    assert all("malformed task" in error for error in failed[1])
    assert "unknown task kind 42" in failed[2][0]
    assert "args are a tuple or list" in failed[3][0]
    assert "kwargs are a dict with str keys" in failed[4][0]
    assert "was never sent on this link" in failed[5][0]
    assert conn.is_open
    still_works(executor)
    assert "malformed" in cluster.log(0)


def test_a_tasks_frame_that_cannot_be_answered_closes_the_link_with_a_goodbye(one_member):
    cluster, raw, executor = one_member
    for body in (None, ([], [], [None]), ([], [], [("no id", 1, 0, (), {})]), ([], [], 7)):
        conn = raw.connect()
        messaging.send(conn, "tasks", body)
        assert raw.closed.get(timeout=RESULT_TIMEOUT) is conn
        assert conn.farewell and ("'tasks' body" in conn.farewell or "usable id" in conn.farewell), conn.farewell
    conn = raw.connect()
    messaging.send(conn, "init", None)  # the initializer "fails": this link's tasks fail saying so
    messaging.send(conn, "tasks", ([], [], [(1, 99, 0, *grid.compute.protocol.pack_arguments((), {}))]))
    [(task_id, status, value, _)] = raw.results.get(timeout=RESULT_TIMEOUT)
    assert (task_id, status) == (1, grid.compute.protocol.FAILED)
    assert "initializer failed" in str(serialize.unpack_error(value))
    still_works(executor)


def test_every_malformed_request_is_answered_with_an_error(one_member):
    """An unhashable message type, or `join` with None, used to go unanswered."""
    cluster, raw, executor = one_member
    conn = raw.connect()
    cases = [(["unhashable"], None, "message type"), ("join", None, "'join' body"),
             ("join", {"member": {}}, "'join' body"), ("no such type", None, "unknown message type")]
    for message_type, body, expected in cases:
        with pytest.raises(GridError, match=expected):
            messaging.request(conn, message_type, body).result(RESULT_TIMEOUT)
    for payload in (("a", "b", "c"), "just a string", (1, None)):
        raw_reply = conn.request(serialize.dumps(payload)).result(RESULT_TIMEOUT)
        error = serialize.loads(raw_reply.payload)
        assert isinstance(error, messaging.MalformedMessage), error
    assert conn.is_open, "a malformed request is answered, not a reason to drop the link"
    messaging.send(conn, ["unhashable"], None)  # one-way: logged and dropped
    assert messaging.request(conn, "services", None).result(RESULT_TIMEOUT) == []
    still_works(executor)
    assert "bad input" in cluster.log(0)


def test_every_message_type_answers_a_request_with_a_malformed_body(one_member):
    """Each type the member handles, asked with bodies of the wrong shape: an answer (a result or
    an error) or a closed link, never silence."""
    cluster, raw, executor = one_member
    conn = raw.connect()
    with pytest.raises(messaging.UnknownMessage) as unknown:
        messaging.request(conn, "list your types", None).result(RESULT_TIMEOUT)
    handled = ast.literal_eval(str(unknown.value).split("this member handles: ", 1)[1])
    assert "join" in handled and "tasks" in handled
    for message_type in handled:
        if message_type in ("leave", "removed", "merge"):  # well-formed enough, they make the member rejoin
            continue
        for body in (None, 1, {}, ("x",), {"member": None}):
            if not conn.is_open:
                conn = raw.connect()
            answer = messaging.request(conn, message_type, body)
            try:
                answer.exception(RESULT_TIMEOUT)
            except TimeoutError:
                pytest.fail(f"{message_type!r} with body {body!r} was never answered")
    still_works(executor)


def test_a_data_op_with_bad_limits_is_refused_and_the_link_stays(one_member):
    """An op's limits are computed with on the IO thread (now + ttl): a ttl that is not a number
    used to be found only there. So is any other field of the wrong type."""
    from grid.data.node import NotOwner
    from grid.data.store import MAP, Op, op_fields

    cluster, raw, executor = one_member
    conn = raw.connect()
    for bad in (("soon", None, None), (None, None, -1), "ttl", (1, 2)):
        fields = (MAP, "m", "set", (b"k", b"v"), "call", 0, bad, ())
        with pytest.raises(GridError, match="'data.op' body"):
            messaging.request(conn, "data.op", (0, fields)).result(RESULT_TIMEOUT)
    for fields in ((MAP, "m", "set", [b"k", b"v"], "call", 0, (), ()), (MAP, 7, "set", (), None, 0, (), ()),
                   (MAP, "m", "set", (), None, "0", (), ()), (MAP, "m", "set", (), None, 0, ()), "fields",
                   (MAP, "m", "set", (), None, 0, (), ("lock",)), (MAP, "m", "set", (), None, 0, (), ("lock", "1"))):
        with pytest.raises(GridError, match="'data.op' body"):
            messaging.request(conn, "data.op", (0, fields)).result(RESULT_TIMEOUT)
    with pytest.raises(GridError, match="'data.op' body"):  # (an Op itself does not travel: its fields do)
        messaging.request(conn, "data.op", (0, Op(MAP, "m", "get", (b"k",)))).result(RESULT_TIMEOUT)
    with pytest.raises(GridError, match="'data.ops' body"):
        messaging.request(conn, "data.ops", [(0, (MAP, "m", "get", (b"k",), None, 0, (), ())), (1, "x")]).result(
            RESULT_TIMEOUT)
    assert conn.is_open
    good = op_fields(Op(MAP, "m", "set", (b"k", b"v"), "call", 0, (60, None, None)), 0)
    with pytest.raises(NotOwner):  # (well-formed: routed by an old table, so answered with the newer one)
        messaging.request(conn, "data.op", (0, good)).result(RESULT_TIMEOUT)


# -- poison tasks --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_poison_task_fails_naming_each_death_and_later_submits_fail_fast(local_cluster):
    """A task that kills each member it runs on, with max_retries (3) >= members (2): the future
    used to hang forever once no member was left, and so did every later submit."""
    cluster = local_cluster(2, heartbeat_interval=0.2, failure_timeout=1.0)
    with grid.connect(cluster.config()) as client:
        executor = grid.GridExecutor(cluster=client, max_retries=3)
        try:
            waiting = executor.submit_to_member(client.members()[0], helpers.pid)
            assert waiting.result(RESULT_TIMEOUT)
            error = executor.submit(helpers.exit_now, 7).exception(RESULT_TIMEOUT)
            assert isinstance(error, WorkerCrashed), error
            assert "no member of the cluster has been reachable" in str(error)
            assert "(1) member" in str(error) and "(2) member" in str(error), str(error)
            started = time.monotonic()
            later = executor.submit(helpers.pid).exception(RESULT_TIMEOUT)
            assert isinstance(later, BrokenGrid) and "no member" in str(later)
            assert time.monotonic() - started < 1.0, "a later submit fails at once"
        finally:
            executor.shutdown(wait=True)


@pytest.mark.slow
def test_an_embedded_cluster_outlives_a_poison_task(tmp_path, monkeypatch):
    """The task kills both members, then both restarted ones: it fails naming four deaths, and
    the restarted members take later work."""
    monkeypatch.delenv("GRID", raising=False)
    monkeypatch.delenv("GRID_SECRET", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with grid.GridExecutor(max_workers=2, max_retries=3) as executor:
        assert executor._embedded is not None
        error = executor.submit(helpers.exit_now, 7).exception(120)
        assert isinstance(error, WorkerCrashed), error
        text = str(error)
        assert "after 4 attempts" in text
        assert text.count("exited with code 7") == 4, text
        assert "log ends with" in text
        deadline = time.monotonic() + 60
        while True:  # the members are restarted once more; a submit in between may find none yet
            try:
                assert executor.submit(helpers.pid).result(RESULT_TIMEOUT) in executor._embedded.pids()
                break
            except BrokenGrid:
                assert time.monotonic() < deadline, "the embedded members never came back"
                wait_for(lambda: executor.link_count() > 0, 30, "a restarted member to be linked")


def test_the_supervisor_reads_a_dead_members_pipes_ending_together(tmp_path):
    """A dead member's stdout and stderr both at their end in one look: reading stdout's end
    closed it, and then telling stderr from stdout asked the closed stdout for its fd
    (ValueError), which ended the "grid-embedded" thread: no member was restarted again (an
    embedded executor under load failed its poison task with "no member reachable")."""
    import selectors

    from grid.compute import embedded

    popen = subprocess.Popen([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    popen.wait()
    supervisor = embedded.EmbeddedCluster.__new__(embedded.EmbeddedCluster)  # only its reading half
    supervisor._selector = selectors.DefaultSelector()
    supervisor._monitor = None
    log_path = str(tmp_path / "member.log")
    process = embedded._Process(popen, log_path, ("127.0.0.1", 0), time.monotonic() + 10)
    for pipe in (popen.stdout, popen.stderr):
        os.set_blocking(pipe.fileno(), False)
        process.partial[pipe.fileno()] = b""
        supervisor._selector.register(pipe.fileno(), selectors.EVENT_READ, process)
    try:
        supervisor._drain_now(process)
        assert process.drained.is_set() and popen.stdout.closed and popen.stderr.closed
        with open(log_path, "rb") as log:
            assert log.read() == b"err\n"
    finally:
        supervisor._selector.close()


# -- Ctrl-C at exit ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("where", ["result", "exit"])
def test_one_ctrl_c_ends_a_program_waiting_on_a_task(tmp_path, where):
    """Ctrl-C in ``result()`` used to leave the exit waiting for the task forever, so it took a
    second Ctrl-C. (Ctrl-C during the exit's own wait, "exit", ended it before too: a guard.)"""
    script = textwrap.dedent(f"""
        import time, grid
        executor = grid.GridExecutor(1)
        future = executor.submit(time.sleep, 120)  # the task's work, in the member
        print("running", flush=True)
        if {where == "result"!r}:
            future.result()
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("GRID", "GRID_SECRET")}
    env["HOME"] = str(tmp_path)
    program = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert program.stdout.readline().strip() == "running"
        wait_for(lambda: _waiting(program.pid), 30, "the program to wait")
        program.send_signal(signal.SIGINT)
        try:
            program.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail("one Ctrl-C did not end the program")
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()
        program.stdout.close()
        program.stderr.close()


def _waiting(pid: int) -> bool:
    """The main thread of ``pid`` is blocked (sleeping), not still starting up."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "S"


# -- bad input from a member, on the executor's side ------------------------------------------------------------


def test_malformed_results_close_the_link_and_its_tasks_run_again(local_cluster, tmp_path):
    """A member that sends garbage for results: its link is closed and what it had in flight
    fails over, instead of those tasks hanging."""
    cluster = local_cluster(2)
    gate = str(tmp_path / "gate")
    with grid.connect(cluster.config()) as client:
        executor = grid.GridExecutor(cluster=client)
        try:
            member = client.members()[0]
            future = executor.submit_to_member(member, helpers.wait_for_file, gate)  # pinned: fails, not retried
            other = executor.submit(helpers.wait_for_file, gate)
            wait_for(lambda: sum(len(link.in_flight) for link in executor._links.values()) == 2, 10,
                     "both tasks in flight")
            link = executor._links[member.uuid]
            executor._transport.call_soon(executor._on_results, link.conn, [("not", "a result")])
            with pytest.raises(WorkerCrashed, match="malformed 'results'"):
                future.result(RESULT_TIMEOUT)
            open(gate, "w").close()
            assert other.result(RESULT_TIMEOUT) == gate
            assert executor.submit_to_member(member, helpers.pid).result(RESULT_TIMEOUT), "linked again"
        finally:
            open(gate, "w").close()
            executor.shutdown(wait=True)


# -- task_processes: a crash kills a child of the member, not the member -----------------------------------------


@pytest.mark.slow
def test_with_task_processes_a_poison_task_kills_a_child_and_the_member_lives_on(local_cluster):
    from . import executor_helpers

    cluster = local_cluster(1, task_processes=2, heartbeat_interval=0.2, failure_timeout=1.0)
    with grid.connect(cluster.config()) as client:
        [member] = client.members()
        executor = grid.GridExecutor(cluster=client, initializer=executor_helpers.initialize, initargs=("token",))
        try:
            pids = {executor.submit(helpers.pid).result(RESULT_TIMEOUT) for _ in range(20)}
            assert member.pid not in pids, "tasks run in child processes of the member"
            assert executor.submit(executor_helpers.member_uuid).result(RESULT_TIMEOUT) == member.uuid
            for _ in range(3):  # each kills a child, which is started again
                error = executor.submit(helpers.exit_now, 7).exception(RESULT_TIMEOUT)
                assert isinstance(error, WorkerCrashed), error
                assert "killed the process running it" in str(error) and "exited with code 7" in str(error)
            assert [m.uuid for m in client.members()] == [member.uuid], "the member was not lost"
            futures = [executor.submit(executor_helpers.initialized_token) for _ in range(10)]
            assert [f.result(RESULT_TIMEOUT) for f in futures] == ["token"] * 10, "new children ran the initializer"
            assert list(executor.map(executor_helpers.square, range(100), chunksize=7)) == [x * x for x in range(100)]
        finally:
            executor.shutdown(wait=True)
    assert "task process" in cluster.log(0)
