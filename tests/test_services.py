"""Named services: the per-process registry, and calls routed to the members that offer a name.

In-process tests run a ``grid.Peer`` in this process, so it offers what this process
registers; the sim tests start member processes of which only some import a service
module (config ``imports``), to prove the routing and the failover.
"""

from __future__ import annotations

import logging
import os
import textwrap
import threading
import uuid

import pytest

import grid
from grid.compute import services
from grid.errors import ServiceNotFound
from grid.errors import RemoteTraceback

from .conftest import wait_for

RESULT_TIMEOUT = 30  # seconds; a hang fails the test instead of blocking the run


@pytest.fixture(autouse=True)
def registry():
    """This process's service registry, restored after the test (tests register what they need)."""
    saved = dict(services._registry)
    yield services._registry
    services._registry.clear()
    services._registry.update(saved)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- the registry -------------------------------------------------------------------------------------------


def test_decorator_registers_under_the_name_and_returns_the_function_unchanged():
    name = unique("triple")

    @grid.compute.services.service(name)
    def triple(x):
        return 3 * x

    assert triple(4) == 12, "still a plain local function"
    assert triple.__name__ == "triple"
    assert name in services.offered()
    assert services.call_service(name, 5) == 15


def test_bare_decorator_and_empty_call_use_the_function_name():
    @services.service
    def bare_service_example(x):
        return x + 1

    @services.service()
    def called_service_example(x):
        return x + 2

    assert bare_service_example(1) == 2
    assert services.call_service("bare_service_example", 1) == 2
    assert services.call_service("called_service_example", 1) == 3


def test_registering_another_function_under_a_taken_name_replaces_it_and_logs(caplog):
    name = unique("replaced")
    services.service(name)(lambda: "old")
    with caplog.at_level(logging.INFO, logger="grid.services"):
        services.service(name)(lambda: "new")
    assert services.call_service(name) == "new"
    assert services.offered().count(name) == 1
    assert any(name in record.getMessage() and "replaces" in record.getMessage() for record in caplog.records)


def test_re_running_a_module_re_registers_its_services(tmp_path, monkeypatch):
    source = "import grid.compute.services\n@grid.compute.services.service('reloaded_example')\ndef answer():\n    return {value}\n"
    path = tmp_path / "reloaded_services_example.py"
    path.write_text(source.format(value=1))
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    assert services.call_service("reloaded_example") == 1
    path.write_text(source.format(value=2))
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # what exec_all / reload do
    assert services.call_service("reloaded_example") == 2


@pytest.mark.parametrize("name, error", [(5, TypeError), (b"bytes", TypeError), ("", ValueError),
                                         ("   ", ValueError)])
def test_a_bad_name_is_refused_with_a_clear_message(name, error):
    with pytest.raises(error, match="service name must be a non-empty string"):
        services.service(name)


def test_decorating_something_that_is_not_callable_is_refused():
    with pytest.raises(TypeError, match="decorates a function"):
        services.service("not-callable")(42)


def test_offered_lists_the_names_sorted(registry):
    registry.clear()
    for name in ("zeta", "alpha", "mid"):
        services.service(name)(len)
    assert services.offered() == ["alpha", "mid", "zeta"]


def test_call_service_of_a_name_not_offered_names_the_member_and_what_it_offers(monkeypatch, registry):
    registry.clear()
    services.service("present")(len)
    member = grid.Member(uuid="u1", address=("127.0.0.1", 5701))
    monkeypatch.setattr(grid.compute.worker, "_current_member", member)
    with pytest.raises(ServiceNotFound, match="absent") as caught:
        services.call_service("absent")
    message = str(caught.value)
    assert "127.0.0.1:5701" in message and "['present']" in message
    assert "@grid.service" in message
    assert isinstance(caught.value, LookupError)


def test_the_services_request_handler_answers_what_is_offered(registry):
    class Router:
        handlers: dict = {}

        def register(self, message_type, handler):
            self.handlers[message_type] = handler

    registry.clear()
    services.service("one")(len)
    router = Router()
    services.register_handlers(router)
    assert router.handlers["services"](None, None) == ["one"]


# -- in-process member and a client -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    """A member running in this process (offering what this process registers) and a client of it."""
    base = {"id": unique("services"), "secret": "services-test", "join": "tcp", "interface": "127.0.0.1",
            "join_timeout": 0.2}
    peer = grid.Peer(dict(base, port=0)).start(10)
    try:
        with grid.connect(dict(base, members=["%s:%d" % peer.address])) as cluster:
            cluster.executor()  # made here, so its threads belong to the module, not to the first test
            yield cluster
    finally:
        peer.close()


def test_a_service_is_reachable_from_a_client(client):
    name = unique("scale")

    @services.service(name)
    def scale(x, *, factor=2):
        return x * factor

    proxy = client.service(name)
    assert proxy(21) == 42
    assert proxy(2, factor=10) == 20
    assert proxy.submit(4).result(RESULT_TIMEOUT) == 8
    assert client.executor().submit_service(name, 5).result(RESULT_TIMEOUT) == 10
    assert list(proxy.map(range(50))) == [2 * x for x in range(50)]
    assert list(proxy.map(range(5), timeout=RESULT_TIMEOUT, chunksize=1)) == [0, 2, 4, 6, 8]
    assert name in repr(proxy)


def test_a_service_registered_after_the_links_opened_is_found(client):
    executor = client.executor()
    executor.submit(len, "warm").result(RESULT_TIMEOUT)  # links up, services already asked
    name = unique("late")
    services.service(name)(str.upper)
    assert executor.submit_service(name, "late").result(RESULT_TIMEOUT) == "LATE"


def test_a_missing_service_fails_at_once_with_the_names_that_exist(client):
    present = unique("present")
    services.service(present)(len)
    executor = client.executor()
    with pytest.raises(ServiceNotFound) as caught:
        client.service("no-such-service")(1)
    message = str(caught.value)
    assert "'no-such-service'" in message
    assert repr(present) in message, "lists what the cluster offers"
    assert "imports" in message and "--import" in message, "says how to offer one"
    with pytest.raises(ServiceNotFound):
        executor.map_service("no-such-service", range(3))
    assert executor._outstanding == 0 and not executor._service_backlog, "nothing was queued"


def test_an_exception_in_a_service_re_raises_with_the_remote_traceback(client):
    name = unique("failing")

    @services.service(name)
    def failing(x):
        raise KeyError(f"no {x}")

    with pytest.raises(KeyError, match="no thing") as caught:
        client.service(name)("thing")
    assert isinstance(caught.value.__cause__, RemoteTraceback)
    assert "failing" in caught.value.__cause__.text


def test_service_calls_beyond_the_credit_wait_and_can_be_cancelled(client):
    name = unique("gated")
    gate = threading.Event()
    services.service(name)(lambda x: gate.wait(RESULT_TIMEOUT) and x)
    executor = client.executor()
    count = executor.capacity() + 3
    futures = [executor.submit_service(name, i) for i in range(count)]
    try:
        assert sum(len(waiting) for waiting in executor._service_backlog.values()) == 3, "beyond the credit: queued"
        assert all(future.cancel() for future in futures[-3:])
        assert not executor._service_backlog
    finally:
        gate.set()
    assert [future.result(RESULT_TIMEOUT) for future in futures[:-3]] == list(range(count - 3))
    wait_for(lambda: executor._outstanding == 0, RESULT_TIMEOUT, "the executor to go idle")


def test_executor_services_lists_who_offers_what(client):
    name = unique("listed")
    services.service(name)(len)
    executor = client.executor()
    executor.submit_service(name, "x").result(RESULT_TIMEOUT)
    offered = executor.services()
    assert [member.uuid for member in offered[name]] == [member.uuid for member in client.members()]


# -- member processes, only some offering the service ----------------------------------------------------------


SERVICE_MODULE = textwrap.dedent('''
    """Services for tests/test_services.py, imported by some sim members (config `imports`)."""
    import os
    import threading
    import time

    import grid.compute.services

    GATE_TIMEOUT = 30.0


    @grid.compute.services.service("where")
    def where(x=None):
        return os.getpid(), x


    @grid.compute.services.service
    def gated(gate, started_dir):
        """Note that it started here, then wait until the file ``gate`` exists; return this pid."""
        with open(os.path.join(started_dir, str(os.getpid())), "w"):
            pass
        deadline = time.monotonic() + GATE_TIMEOUT
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {gate} never opened")
            threading.Event().wait(0.005)
        return os.getpid()
''')


@pytest.fixture
def service_module(tmp_path, monkeypatch):
    """The name of a module in tmp_path, importable by sim members (tmp_path is on their PYTHONPATH)."""
    name = f"grid_test_services_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(SERVICE_MODULE)
    existing = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + (os.pathsep + existing if existing else ""))
    return name


def test_calls_are_routed_only_to_the_members_that_offer_the_service(local_cluster, service_module):
    cluster = local_cluster(2)  # these two do not import the module
    offering = cluster.add(imports=[service_module])
    with grid.connect(cluster.config()) as client:
        executor = client.executor()
        wait_for(lambda: len(executor._links) == 3, RESULT_TIMEOUT, "links to all three members")
        futures = [executor.submit_service("where", i) for i in range(40)]
        assert [f.result(RESULT_TIMEOUT) for f in futures] == [(offering.pid, i) for i in range(40)]
        assert {pid for pid, _ in client.service("where").map(range(200))} == {offering.pid}
        with pytest.raises(ServiceNotFound, match=r"\['gated', 'where'\]"):
            client.service("resize")(b"image")
        assert [m.pid for m in executor.services()["where"]] == [offering.pid]


def test_a_service_task_fails_over_to_another_member_that_offers_it(local_cluster, service_module, tmp_path):
    cluster = local_cluster(1)  # does not offer the service
    offering = [cluster.add(imports=[service_module]) for _ in range(2)]
    by_pid = {peer.pid: peer for peer in offering}
    started = tmp_path / "started"
    started.mkdir()
    with grid.connect(cluster.config(0)) as client:
        executor = client.executor()
        wait_for(lambda: sum(link.services is not None for link in executor._links.values()) == 3,
                 RESULT_TIMEOUT, "every member to say what it offers")

        # the member running it dies: it runs again on the other offering member
        gate = tmp_path / "gate-1"
        future = executor.submit_service("gated", str(gate), str(started))
        first = wait_for(lambda: os.listdir(started), RESULT_TIMEOUT, "the service to start")[0]
        cluster.kill(by_pid[int(first)].index)
        survivor = next(pid for pid in by_pid if pid != int(first))
        wait_for(lambda: str(survivor) in os.listdir(started), RESULT_TIMEOUT, "the retry to start")
        gate.touch()
        assert future.result(RESULT_TIMEOUT) == survivor

        # the last offering member dies: no member can run it, and the error says so
        gate = tmp_path / "gate-2"
        (started / str(survivor)).unlink()
        future = executor.submit_service("gated", str(gate), str(started))
        wait_for(lambda: os.listdir(started), RESULT_TIMEOUT, "the service to start")
        cluster.kill(by_pid[survivor].index)
        error = future.exception(RESULT_TIMEOUT)
        assert isinstance(error, grid.WorkerCrashed)
        assert "no remaining member offers service 'gated'" in str(error)
        assert "was lost" in str(error)
        with pytest.raises(ServiceNotFound):
            executor.submit_service("gated", str(gate), str(started))
        assert executor.submit(os.getpid).result(RESULT_TIMEOUT) == cluster.peers[0].pid, "ordinary tasks still run"
