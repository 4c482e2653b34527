"""Cluster-wide code against real member processes: run_all, eval_all, exec_all, load_all, deploy.

Each test starts its own ``sim.LocalCluster`` (about half a second) and a client on it.
Code that the test process runs locally (``exec_all`` and ``load_all`` run here first)
is removed from ``sys.modules`` after each test, so no test sees another's modules.
"""

from __future__ import annotations

import json
import math
import os
import py_compile
import socket
import subprocess
import sys
import textwrap
import threading
import types

import pytest

import grid
from grid.code import patches
from grid.net import serialize

from . import livecode_helpers as helpers
from .conftest import wait_for

pytestmark = pytest.mark.slow

FAST = {"heartbeat_interval": 0.2, "failure_timeout": 1.5}
RESULT_TIMEOUT = 30  # seconds; a hang fails the test instead of blocking the run
JOIN_TIMEOUT = 20

WORKER_SOURCE = textwrap.dedent("""
    import grid

    def worker(x):
        return x * x, grid.current_member().uuid
""")


# -- fixtures and helpers ---------------------------------------------------------------------------------------


def is_test_module(name: str) -> bool:
    """The modules these tests make: "user" (exec_all's default) and names starting with "lc_"."""
    return name == "user" or name.startswith(("user.", "lc_"))


@pytest.fixture(autouse=True)
def forget_local_code():
    """Drop what cluster-wide code imported into this process (``local=True`` runs it here too)."""
    modules = {name for name in sys.modules if is_test_module(name)}
    assert not modules, f"modules of an earlier test are still loaded: {sorted(modules)}"
    meta_path = list(sys.meta_path)
    shipped = dict(patches._finder.sources)
    yield
    for name in [name for name in sys.modules if is_test_module(name)]:
        del sys.modules[name]
    sys.meta_path[:] = meta_path
    patches._finder.sources.clear()
    patches._finder.sources.update(shipped)


class Grid:
    """A sim cluster and one client connected to all of its members."""

    def __init__(self, sim, client):
        self.sim = sim
        self.client = client

    def live_uuids(self) -> set:
        return {peer.uuid for peer in self.sim.peers if peer.alive}

    def member(self, uuid: str):
        return next(member for member in self.client.members() if member.uuid == uuid)

    def add(self, **overrides):
        """Start one more member and wait until the client and every member agree on it."""
        peer = self.sim.add(**overrides)
        self.wait_settled()
        return self.member(peer.uuid)

    def wait_settled(self) -> None:
        """Wait until every live member, and the client, see exactly the live members, one master."""
        agree(self.sim)
        wait_for(lambda: {m.uuid for m in self.client.members()} == self.live_uuids(), JOIN_TIMEOUT,
                 "the client to see every live member")


def agree(sim) -> None:
    """Wait until every live peer's own member list holds exactly the live peers, with one master."""
    expected = {peer.uuid for peer in sim.peers if peer.alive}
    views = []
    try:
        for peer in sim.peers:
            if peer.alive:
                views.append(grid.connect(sim.config(peer.index)))

        def agreed() -> bool:
            masters = set()
            for view in views:
                members = view.members()
                if {m.uuid for m in members} != expected:
                    return False
                masters.add(members[0].uuid)
            return len(masters) == 1

        wait_for(agreed, JOIN_TIMEOUT, f"{len(expected)} members to agree on one cluster")
    finally:
        for view in views:
            view.close()


@pytest.fixture
def make_grid(local_cluster):
    """``make_grid(n=3, **config) -> Grid``: a settled sim cluster and a client (closed at teardown)."""
    clients = []

    def make(n: int = 3, **config) -> Grid:
        sim = local_cluster(n, **{**FAST, **config})
        client = grid.connect(sim.config())
        clients.append(client)
        made = Grid(sim, client)
        made.wait_settled()
        return made

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def grid3(make_grid) -> Grid:
    return make_grid(3)


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def write_package(root, name: str = "lc_pkg"):
    """A package ``name`` with a submodule its __init__ imports, one it does not, and a subpackage."""
    write(root / name / "__init__.py", """
        from . import sub

        VERSION = 1
    """)
    write(root / name / "sub.py", """
        def triple(x):
            return 3 * x
    """)
    write(root / name / "lazy.py", """
        NAME = "lazy"
    """)
    write(root / name / "inner" / "__init__.py", "")
    write(root / name / "inner" / "deep.py", """
        from .. import sub

        def nine_times(x):
            return sub.triple(sub.triple(x))
    """)
    return root / name


def by_uuid(results: dict) -> dict:
    return {member.uuid: value for member, value in results.items()}


def subprocess_environment(**extra) -> dict:
    environment = {key: value for key, value in os.environ.items() if key not in ("GRID", "GRID_SECRET")}
    environment.update(extra)
    return environment


# -- 1. exec_all, then functions it defines travel by reference --------------------------------------------------


CLIENT_WITHOUT_CLOUDPICKLE = textwrap.dedent("""
    import json, sys
    sys.modules["cloudpickle"] = None  # any import of it fails: functions must travel by reference
    import grid
    from grid.net import serialize

    with grid.connect(sys.argv[1]) as cluster:
        cluster.exec_all(sys.argv[2])
        import user  # exec_all ran here too, and registered the module

        executor = cluster.executor()
        # Every member linked first: on a loaded machine a first link attempt may fail and be made
        # again. A task pinned to each member waits for (or makes) that member's link.
        for future in executor.submit_to_all(int).values():
            future.result(20)
        results = list(executor.map(user.worker, range(60), chunksize=1))
        try:
            serialize.dumps_function(lambda x: x)
            lambdas = "travel"
        except serialize.SerializationError:
            lambdas = "refused"
        print(json.dumps({"cloudpickle": serialize._cloudpickle is not None, "lambdas": lambdas,
                          "results": results}))
""")


def test_functions_defined_by_exec_all_run_on_every_member_without_cloudpickle(grid3, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_WITHOUT_CLOUDPICKLE, grid3.sim.write_client_config(), WORKER_SOURCE],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=subprocess_environment())
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["cloudpickle"] is False and report["lambdas"] == "refused", "cloudpickle was really hidden"
    assert [square for square, _ in report["results"]] == [x * x for x in range(60)]
    assert {member for _, member in report["results"]} == grid3.live_uuids(), "all 3 members computed"
    assert [str(patch) for patch in grid3.client.patches()] == ["#1 exec user: import grid"]


# -- 2. eval_all ---------------------------------------------------------------------------------------------------


def test_eval_all_returns_one_result_per_member(grid3):
    assert set(grid3.client.exec_all("import os")) == set(grid3.client.members())
    pids = grid3.client.eval_all("os.getpid()")
    assert set(pids) == set(grid3.client.members())
    assert by_uuid(pids) == {peer.uuid: peer.pid for peer in grid3.sim.peers}
    assert os.getpid() not in pids.values()
    # Another module is another namespace: the names of "user" are not there.
    assert set(grid3.client.eval_all("'os' in globals()", module="lc_other").values()) == {False}
    # A value that cannot travel back fails on every member, with a message that says so.
    with pytest.raises(grid.SomeMembersFailed) as caught:
        grid3.client.eval_all("__import__('threading').Lock()")
    assert caught.value.results == {} and set(caught.value.errors) == set(grid3.client.members())
    assert all("cannot be pickled" in str(error) for error in caught.value.errors.values())


# -- 3. run_all ----------------------------------------------------------------------------------------------------


def test_run_all_calls_an_importable_function_on_every_member(grid3):
    results = grid3.client.run_all(helpers.whoami, 1, 2, key="value")
    assert set(results) == set(grid3.client.members())
    for member, (uuid, args, kwargs) in results.items():
        assert uuid == member.uuid, "each result is keyed by the member that computed it"
        assert args == (1, 2) and kwargs == {"key": "value"}


def test_run_all_calls_a_lambda_closure_on_every_member(grid3):
    offset = 40
    results = grid3.client.run_all(lambda x: (x + offset, grid.current_member().uuid), 2)
    assert by_uuid(results) == {uuid: (42, uuid) for uuid in grid3.live_uuids()}


def test_run_all_failing_on_one_member_keeps_the_other_results(grid3):
    victim = grid3.client.members()[1]
    with pytest.raises(grid.SomeMembersFailed) as caught:
        grid3.client.run_all(helpers.fail_on, victim.uuid)
    assert set(caught.value.errors) == {victim}
    assert isinstance(caught.value.errors[victim], LookupError)
    assert by_uuid(caught.value.results) == {uuid: uuid for uuid in grid3.live_uuids() - {victim.uuid}}


# -- 4. load_all and deploy ------------------------------------------------------------------------------------------


def test_load_all_of_a_file_as_its_own_name_and_as_a_named_module(grid3, tmp_path):
    client = grid3.client
    shapes = write(tmp_path / "src" / "lc_shapes.py", """
        def area(r):
            return 3 * r * r
    """)
    assert not any(client.run_all(helpers.can_import, "lc_shapes").values()), "members cannot import it yet"
    assert set(client.load_all(shapes)) == set(client.members())
    import lc_shapes  # load_all ran it here too

    assert set(client.run_all(lc_shapes.area, 2).values()) == {12}
    assert set(client.eval_all("area(3)", module="lc_shapes").values()) == {27}

    client.load_all(shapes, module="lc_geometry")
    import lc_geometry

    assert set(client.run_all(lc_geometry.area, 1).values()) == {3}
    assert [(p.seq, p.kind, p.module, p.files) for p in client.patches()] == [
        (1, "load", "lc_shapes", (("lc_shapes", str(shapes)),)),
        (2, "load", "lc_geometry", (("lc_geometry", str(shapes)),)),
    ]


def test_reloading_a_changed_file_updates_the_function_on_members(grid3, tmp_path):
    client = grid3.client
    shapes = write(tmp_path / "lc_shapes.py", """
        def area(r):
            return 3 * r * r
    """)
    client.load_all(shapes)
    import lc_shapes

    assert set(client.run_all(lc_shapes.area, 2).values()) == {12}
    write(shapes, """
        def area(r):
            return 4 * r * r

        def perimeter(r):
            return 8 * r
    """)
    client.load_all(shapes)
    assert set(client.run_all(lc_shapes.area, 2).values()) == {16}, "the new code runs on every member"
    assert set(client.run_all(lc_shapes.perimeter, 2).values()) == {16}
    assert lc_shapes.area(2) == 16, "and here, in place: the module object is the same"


def test_load_all_of_a_package_folder_with_submodules(grid3, tmp_path):
    client = grid3.client
    folder = write_package(tmp_path)
    client.load_all(folder)
    import lc_pkg
    import lc_pkg.inner.deep

    assert set(client.run_all(lc_pkg.sub.triple, 2).values()) == {6}
    assert set(client.run_all(lc_pkg.inner.deep.nine_times, 2).values()) == {18}
    # A submodule the package does not import itself is importable on members by name.
    assert set(client.eval_all("__import__('lc_pkg.lazy').lazy.NAME").values()) == {"lazy"}
    [patch] = client.patches()
    assert patch.kind == "load" and patch.module == "lc_pkg"
    assert [name for name, _ in patch.files] == ["lc_pkg", "lc_pkg.inner", "lc_pkg.inner.deep", "lc_pkg.lazy",
                                                 "lc_pkg.sub"]


def test_deploy_ships_a_module_only_this_process_can_import(grid3, tmp_path, monkeypatch):
    client = grid3.client
    source = write(tmp_path / "lc_deployed.py", """
        def greet(name):
            return f"hello {name} from {__name__}"
    """)
    monkeypatch.syspath_prepend(str(tmp_path))  # this process only: not on the members' PYTHONPATH
    import lc_deployed

    assert not any(client.run_all(helpers.can_import, "lc_deployed").values())
    assert set(client.deploy(lc_deployed)) == set(client.members())
    assert b"cloudpickle" not in serialize.dumps_function(lc_deployed.greet), "it pickles by reference"
    assert set(client.run_all(lc_deployed.greet, "x").values()) == {"hello x from lc_deployed"}
    executor = client.executor()
    assert list(executor.map(lc_deployed.greet, ["a", "b"])) == ["hello a from lc_deployed",
                                                                 "hello b from lc_deployed"]
    # A changed file deployed again replaces the code on members (the reference stays the same).
    write(source, """
        def greet(name):
            return f"hi {name}"
    """)
    client.deploy("lc_deployed")
    assert set(client.run_all(lc_deployed.greet, "x").values()) == {"hi x"}
    assert [(p.seq, p.kind, p.module) for p in client.patches()] == [(1, "deploy", "lc_deployed"),
                                                                     (2, "deploy", "lc_deployed")]


def test_deploy_of_a_submodule_ships_its_whole_package(grid3, tmp_path, monkeypatch):
    client = grid3.client
    write_package(tmp_path / "src", "lc_dpkg")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    import lc_dpkg.inner.deep

    assert not any(client.run_all(helpers.can_import, "lc_dpkg").values())
    client.deploy("lc_dpkg.inner.deep")
    assert set(client.run_all(lc_dpkg.inner.deep.nine_times, 1).values()) == {9}
    assert {tuple(names) for names in client.run_all(helpers.loaded, ["lc_dpkg", "lc_dpkg.inner.deep"]).values()} \
        == {("lc_dpkg", "lc_dpkg.inner.deep")}
    [patch] = client.patches()
    assert patch.kind == "deploy" and patch.module == "lc_dpkg.inner.deep"
    assert "lc_dpkg.lazy" in dict(patch.files), "the whole top-level package travels"


def test_load_all_as_a_dotted_module_creates_its_parent(grid3, tmp_path):
    shapes = write(tmp_path / "lc_shapes.py", """
        def area(r):
            return 3 * r * r
    """)
    grid3.client.load_all(shapes, module="lc_tools.geometry")
    import lc_tools.geometry

    assert set(grid3.client.run_all(lc_tools.geometry.area, 1).values()) == {3}
    assert set(grid3.client.eval_all("area(1)", module="lc_tools.geometry").values()) == {3}
    newcomer = grid3.add()
    assert grid3.client.eval_all("area(2)", module="lc_tools.geometry")[newcomer] == 12, "replayed too"


# -- 5. a member that joins later replays the log before its first task -----------------------------------------------


GATED_SOURCE = textwrap.dedent("""
    import socket
    import grid

    _me = grid.current_member()
    if _me is not None and _me.uuid not in %(original)r:
        # A member that joins later replays this patch first; it waits here for the test's gate
        # (a listening socket: closing it resets this connection), so the test can send it a task
        # while it is still replaying.
        try:
            with socket.create_connection(%(gate)r, timeout=60) as _gate:
                _gate.recv(1)
        except OSError:
            pass

    def worker(x):
        import lc_deployed, lc_pkg.sub, lc_shapes
        return {
            "member": grid.current_member().uuid,
            "square": x * x,
            "area": lc_shapes.area(2),
            "triple": lc_pkg.sub.triple(2),
            "greeting": lc_deployed.greet("x"),
            "last": globals().get("LAST"),
        }
""")

MODULES_EXPRESSION = ("sorted(n for n in ('lc_shapes', 'lc_pkg', 'lc_pkg.sub', 'lc_deployed') "
                      "if n in __import__('sys').modules)")


def patch_everything(client, tmp_path, monkeypatch, first_source: str = WORKER_SOURCE) -> None:
    """exec, load (twice, changed), load a package, deploy, exec: the log a later joiner must replay."""
    client.exec_all(first_source)
    shapes = write(tmp_path / "src" / "lc_shapes.py", """
        def area(r):
            return 3 * r * r
    """)
    client.load_all(shapes)
    write(shapes, """
        def area(r):
            return 4 * r * r
    """)
    client.load_all(shapes)
    client.load_all(write_package(tmp_path / "pkg"))
    write(tmp_path / "deploy" / "lc_deployed.py", """
        def greet(name):
            return f"hello {name}"
    """)
    monkeypatch.syspath_prepend(str(tmp_path / "deploy"))
    client.deploy("lc_deployed")
    client.exec_all("LAST = 'applied'")


EXPECTED_LOG = [(1, "exec", "user"), (2, "load", "lc_shapes"), (3, "load", "lc_shapes"), (4, "load", "lc_pkg"),
                (5, "deploy", "lc_deployed"), (6, "exec", "user")]


def test_a_member_added_later_replays_every_patch_before_its_first_task(grid3, tmp_path, monkeypatch):
    client = grid3.client
    original = sorted(grid3.live_uuids())
    gate = socket.create_server(("127.0.0.1", 0))  # closed: the gate opens
    patch_everything(client, tmp_path, monkeypatch, GATED_SOURCE % {"original": original,
                                                                     "gate": gate.getsockname()})
    assert [(p.seq, p.kind, p.module) for p in client.patches()] == EXPECTED_LOG
    import user

    executor = client.executor()
    added, add_errors = [], []

    def add():
        try:
            added.append(grid3.sim.add())
        except BaseException as exc:  # reported by the test
            add_errors.append(exc)

    adder = threading.Thread(target=add, name="test-livecode-add")
    adder.start()
    try:
        # The new member is in the cluster while it still waits at the gate in patch #1.
        newcomer = wait_for(lambda: next((m for m in executor.members() if m.uuid not in original), None),
                            JOIN_TIMEOUT, "the 4th member to join")
        # Once the executor's link to it is up and idle, the task goes out at once, on this thread;
        # a request on the same link answered afterwards shows the member has read the task.
        wait_for(lambda: getattr(executor._links.get(newcomer.uuid), "services", None) is not None,
                 RESULT_TIMEOUT, "the executor's link to the new member")
        future = executor.submit_to_member(newcomer, user.worker, 5)
        with pytest.raises(grid.ServiceNotFound):
            executor.submit_service("lc-no-such-service")  # asks every member which services it offers
        assert adder.is_alive(), "the task reached the new member while it was still replaying the log"
        gate.close()
        result = future.result(RESULT_TIMEOUT)
    finally:
        gate.close()
        adder.join()
    assert not add_errors, add_errors
    assert added[0].uuid == newcomer.uuid
    assert result == {"member": newcomer.uuid, "square": 25, "area": 16, "triple": 6, "greeting": "hello x",
                      "last": "applied"}, "the task ran after the whole log, on the new member"
    grid3.wait_settled()
    modules = client.eval_all(MODULES_EXPRESSION)
    assert len(modules) == 4
    assert set(map(tuple, modules.values())) == {("lc_deployed", "lc_pkg", "lc_pkg.sub", "lc_shapes")}
    assert set(client.eval_all("LAST").values()) == {"applied"}


# -- 6. the log survives the death of the master ----------------------------------------------------------------------


def test_the_patch_log_survives_killing_the_master(grid3, tmp_path, monkeypatch):
    client, sim = grid3.client, grid3.sim
    patch_everything(client, tmp_path, monkeypatch)
    before = [(p.seq, p.kind, p.module, p.source, p.files) for p in client.patches()]
    assert [entry[:3] for entry in before] == EXPECTED_LOG
    master = client.master()
    [master_peer] = [peer for peer in sim.peers if peer.uuid == master.uuid]
    sim.kill(master_peer.index)
    grid3.wait_settled()
    assert client.master().uuid != master.uuid
    assert [(p.seq, p.kind, p.module, p.source, p.files) for p in client.patches()] == before
    client.exec_all("AFTER = 'the new master'")
    assert [p.seq for p in client.patches()] == list(range(1, len(before) + 2)), "the log goes on where it was"

    newcomer = grid3.add()
    import user

    executor = client.executor()
    assert executor.submit_to_member(newcomer, user.worker, 3).result(RESULT_TIMEOUT) == (9, newcomer.uuid)
    modules = client.eval_all(MODULES_EXPRESSION)
    assert modules[newcomer] == ["lc_deployed", "lc_pkg", "lc_pkg.sub", "lc_shapes"]
    assert client.eval_all("AFTER, LAST")[newcomer] == ("the new master", "applied")


def test_exec_all_while_the_master_is_frozen_is_logged_once_and_the_old_master_catches_up(make_grid):
    cluster = make_grid(3)
    sim = cluster.sim
    master = cluster.client.master()
    [master_peer] = [peer for peer in sim.peers if peer.uuid == master.uuid]
    linked = next(peer for peer in sim.peers if peer.uuid != master.uuid)
    client = grid.connect(sim.config(linked.index))  # linked to a member that stays up
    try:
        client.exec_all("ORDER = ['before']", local=False)
        sim.pause(master_peer.index)
        try:
            results = client.exec_all("ORDER.append('while frozen')", local=False)
            assert {member.uuid for member in results} == cluster.live_uuids() - {master.uuid}
            assert [p.source for p in client.patches()] == ["ORDER = ['before']", "ORDER.append('while frozen')"]
            assert client.master().uuid != master.uuid
        finally:
            sim.resume(master_peer.index)
        Grid(sim, client).wait_settled()  # the old master is back (as master again, or not)
        assert by_uuid(client.eval_all("ORDER")) == {uuid: ["before", "while frozen"] for uuid in cluster.live_uuids()}
        assert len(client.patches()) == 2, "the retried patch is logged once"
    finally:
        client.close()


def test_patches_from_two_clients_while_a_member_joins_run_in_one_order_everywhere(grid3):
    sim, client = grid3.sim, grid3.client
    client.exec_all("ORDER = []", local=False)
    adder = threading.Thread(target=sim.add, name="test-livecode-add")
    failures = []

    def patch_while_joining(cluster, tag):
        try:
            for i in range(500):
                if i >= 5 and not adder.is_alive():
                    return
                cluster.exec_all(f"ORDER.append('{tag}{i}')", local=False)
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    other = grid.connect(sim.config())
    try:
        writers = [threading.Thread(target=patch_while_joining, args=(cluster, tag), name=f"test-livecode-{tag}")
                   for cluster, tag in ((client, "a"), (other, "b"))]
        adder.start()
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        adder.join()
    finally:
        other.close()
    assert not failures, failures
    grid3.wait_settled()
    orders = client.eval_all("ORDER")
    assert len(orders) == 4
    logged = [p.source for p in client.patches()][1:]
    assert {len(order) for order in orders.values()} == {len(logged)}
    for order in orders.values():
        assert [f"ORDER.append('{item}')" for item in order] == logged, "every member ran the log's order"


def test_exec_all_does_not_hang_while_the_member_the_client_is_linked_to_is_frozen(make_grid):
    cluster = make_grid(3, handshake_timeout=1.0)
    sim = cluster.sim
    master_uuid = cluster.client.master().uuid
    linked = next(peer for peer in sim.peers if peer.uuid != master_uuid)
    client = grid.connect(sim.config(linked.index))
    outcome = []

    def exec_all():
        try:
            outcome.append(client.exec_all("X = 1", local=False))
        except Exception as exc:  # an error is an answer too: the test only asks that it comes
            outcome.append(exc)

    caller = threading.Thread(target=exec_all, name="test-livecode-exec")
    sim.pause(linked.index)
    try:
        caller.start()
        # _code_request's own retry budget, and a second more.
        budget = 2 * FAST["failure_timeout"] + 1.0 + 1.0
        wait_for(lambda: not caller.is_alive(), budget, "exec_all to return while its member is frozen")
    finally:
        sim.resume(linked.index)
        caller.join(RESULT_TIMEOUT)
        client.close()
    [answer] = outcome
    if isinstance(answer, dict):
        assert {member.uuid for member in answer} == cluster.live_uuids() - {linked.uuid}
    else:
        assert isinstance(answer, grid.GridError), answer


# -- 7. allow_code = false ----------------------------------------------------------------------------------------------


def test_a_member_with_allow_code_false_refuses_code_but_runs_tasks(make_grid, tmp_path, monkeypatch):
    cluster = make_grid(2)
    client = cluster.client
    refuser = cluster.add(allow_code=False)
    others = set(client.members()) - {refuser}
    assert len(others) == 2

    def refused_by_exactly_one(call, expected_value):
        with pytest.raises(grid.SomeMembersFailed) as caught:
            call()
        assert set(caught.value.errors) == {refuser}
        error = caught.value.errors[refuser]
        assert isinstance(error, grid.CodeNotAllowed) and isinstance(error, PermissionError)
        assert "allow_code" in str(error)
        assert caught.value.results == {member: expected_value for member in others}
        assert refuser.address[0] in str(caught.value) and str(refuser.address[1]) in str(caught.value)

    refused_by_exactly_one(lambda: client.exec_all("X = 20"), None)
    refused_by_exactly_one(lambda: client.eval_all("X + 1"), 21)
    with pytest.raises(grid.SomeMembersFailed) as caught:
        client.run_all(helpers.can_import, "os")
    assert set(caught.value.errors) == {refuser} and set(caught.value.results.values()) == {True}
    shapes = write(tmp_path / "lc_shapes.py", "def area(r):\n    return 3 * r * r\n")
    refused_by_exactly_one(lambda: client.load_all(shapes), None)
    write(tmp_path / "deploy" / "lc_deployed.py", "def greet(name):\n    return name\n")
    monkeypatch.syspath_prepend(str(tmp_path / "deploy"))
    refused_by_exactly_one(lambda: client.deploy("lc_deployed"), None)
    # Ordinary tasks still run there.
    executor = client.executor()
    assert executor.submit_to_member(refuser, helpers.whoami, 1).result(RESULT_TIMEOUT) == (refuser.uuid, (1,), {})
    # The log is still kept (and ordered) for those that join later.
    assert [(p.seq, p.kind) for p in client.patches()] == [(1, "exec"), (2, "load"), (3, "deploy")]


# -- 8. exec_all failing on one member ------------------------------------------------------------------------------------


def test_exec_all_failing_on_one_member_reports_it_with_its_traceback(grid3):
    client = grid3.client
    victim = client.members()[2]
    source = textwrap.dedent(f"""
        import grid

        _me = grid.current_member()
        if _me is not None and _me.uuid == {victim.uuid!r}:
            raise RuntimeError("this member refuses the patch")
        DEFINED = True
    """)
    with pytest.raises(grid.SomeMembersFailed) as caught:
        client.exec_all(source)
    failed = caught.value
    assert set(failed.errors) == {victim}
    error = failed.errors[victim]
    assert isinstance(error, RuntimeError) and str(error) == "this member refuses the patch"
    remote = error.__cause__.text
    assert 'raise RuntimeError("this member refuses the patch")' in remote, remote
    assert "<exec_all user>" in remote, "the traceback names the patch"
    assert failed.results == {member: None for member in client.members() if member != victim}
    assert "exec_all failed on 1 of 3 members" in str(failed)
    assert "this member refuses the patch" in str(failed)
    # The others ran it to the end; the victim stopped at the raise.
    with pytest.raises(grid.SomeMembersFailed) as caught:
        client.eval_all("DEFINED")
    assert set(caught.value.errors) == {victim} and isinstance(caught.value.errors[victim], NameError)
    assert set(caught.value.results.values()) == {True}
    assert [p.seq for p in client.patches()] == [1], "a patch that failed somewhere stays in the log"


# -- 9. patches() and reset_patches() ------------------------------------------------------------------------------------


def test_reset_patches_clears_the_log_for_new_members_only(grid3):
    client = grid3.client
    client.exec_all("def old():\n    return 'old'")
    client.exec_all("OLD_FLAG = 1")
    patches = client.patches()
    assert [(p.seq, p.kind, p.module) for p in patches] == [(1, "exec", "user"), (2, "exec", "user")]
    assert all(isinstance(p, grid.Patch) for p in patches)
    assert patches[0].source == "def old():\n    return 'old'"
    assert "pid %d" % os.getpid() in patches[0].origin

    assert client.reset_patches() == 2
    assert client.patches() == []
    assert set(client.eval_all("old()").values()) == {"old"}, "the code already run stays"

    client.exec_all("def fresh():\n    return 'fresh'")
    assert [(p.seq, p.module) for p in client.patches()] == [(1, "user")]
    newcomer = grid3.add()
    with pytest.raises(grid.SomeMembersFailed) as caught:
        client.eval_all("old()")
    assert set(caught.value.errors) == {newcomer}, "the new member never ran the cleared patches"
    assert isinstance(caught.value.errors[newcomer], NameError)
    assert set(caught.value.results.values()) == {"old"} and len(caught.value.results) == 3
    assert by_uuid(client.eval_all("fresh()")) == {uuid: "fresh" for uuid in grid3.live_uuids()}


# -- 10. errors before anything is sent ------------------------------------------------------------------------------------


def test_bad_code_and_bad_names_fail_before_anything_is_sent(grid3, tmp_path, monkeypatch):
    client = grid3.client
    shapes = write(tmp_path / "lc_shapes.py", "def area(r):\n    return 3 * r * r\n")
    with pytest.raises(SyntaxError):
        client.exec_all("def broken(:\n    pass")
    with pytest.raises(SyntaxError):
        client.eval_all("1 +")
    with pytest.raises(TypeError):
        client.exec_all(b"X = 1")
    for bad in ("grid", "grid.tools", "__main__", "1x", "", "lc.1x", "a..b"):
        with pytest.raises(ValueError, match="module"):
            client.exec_all("X = 1", module=bad)
        with pytest.raises(ValueError, match="module"):
            client.eval_all("1", module=bad)
        if bad:  # load_all(path, module="") names the module after the file, like module=None
            with pytest.raises(ValueError, match="module"):
                client.load_all(shapes, module=bad)
    with pytest.raises(ValueError, match="'grid'"):
        client.deploy("grid")
    with pytest.raises(ValueError, match="'grid.client'"):
        client.deploy(grid.client)
    with pytest.raises(FileNotFoundError, match="missing.py"):
        client.load_all(tmp_path / "missing.py")
    with pytest.raises(ValueError, match="not a .py file"):
        client.load_all(write(tmp_path / "notes.txt", "X = 1\n"))
    with pytest.raises(SyntaxError):
        client.load_all(write(tmp_path / "lc_broken.py", "def broken(:\n"))
    # Modules without source: the standard library (built in or an extension), code compiled to .pyc
    # only, a module made in memory.
    for stdlib in ("sys", math, "json.decoder"):
        with pytest.raises(ValueError, match="is in the standard library, which every member has"):
            client.deploy(stdlib)
    write(tmp_path / "compiled" / "lc_compiled.py", "def f():\n    return 1\n")
    py_compile.compile(str(tmp_path / "compiled" / "lc_compiled.py"), str(tmp_path / "compiled" / "lc_compiled.pyc"))
    (tmp_path / "compiled" / "lc_compiled.py").unlink()
    monkeypatch.syspath_prepend(str(tmp_path / "compiled"))
    with pytest.raises(ValueError, match=r"cannot deploy lc_compiled: it has no Python source file \(.*lc_compiled"
                                         r"\.pyc\); install it on every member instead"):
        client.deploy("lc_compiled")
    monkeypatch.setitem(sys.modules, "lc_in_memory", types.ModuleType("lc_in_memory"))
    with pytest.raises(ValueError, match=r"cannot deploy lc_in_memory: it has no Python source file \(built in\)"):
        client.deploy("lc_in_memory")
    write(tmp_path / "ext" / "lc_extpkg" / "__init__.py", "")
    (tmp_path / "ext" / "lc_extpkg" / "_speedups.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path / "ext"))
    with pytest.raises(ValueError, match="compiled extension"):
        client.deploy("lc_extpkg")
    # exec_all runs here first: an error raises here and nothing reaches the members.
    with pytest.raises(ZeroDivisionError):
        client.exec_all("REACHED = True\n1 / 0")
    assert client.patches() == []
    assert set(client.eval_all("'REACHED' in globals() or 'X' in globals()").values()) == {False}


# -- 11. the default connection -------------------------------------------------------------------------------------------


DEFAULT_CONNECTION_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.modules["cloudpickle"] = None
    import grid
    from grid.client import default_executor

    grid.exec_all("import os, grid\\ndef worker(x):\\n    return x + 1, grid.current_member().uuid")
    import user

    results = list(grid.fmap(user.worker, range(20)))
    pids = grid.eval_all("os.getpid()")
    print(json.dumps({
        "embedded": default_executor()._embedded is not None,
        "members": sorted(m.uuid for m in default_executor().members()),
        "pids": {m.uuid: pid for m, pid in pids.items()},
        "results": results,
        "me": os.getpid(),
    }))
""")


def test_module_level_exec_all_uses_the_embedded_cluster_of_fmap(tmp_path):
    done = subprocess.run([sys.executable, "-c", DEFAULT_CONNECTION_SCRIPT], capture_output=True, text=True,
                          timeout=90, cwd=tmp_path, env=subprocess_environment(HOME=str(tmp_path)))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["embedded"] is True
    assert [value for value, _ in report["results"]] == list(range(1, 21))
    assert {uuid for _, uuid in report["results"]} <= set(report["members"])
    assert sorted(report["pids"]) == report["members"], "eval_all reached every embedded member"
    assert report["me"] not in report["pids"].values()
    assert len(set(report["pids"].values())) == len(report["members"])
