"""sim.LocalCluster against tests/fake_peer.py, a peer that speaks the contract without grid."""

from __future__ import annotations

import glob
import json
import os
import select
import shlex
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import types

import pytest

import sim
from sim import JOIN_METHODS, LocalCluster, SimError
from sim.__main__ import main as sim_main
from sim.__main__ import parse_settings
from sim.cluster import _LIVE_CLUSTERS
from sim.fixtures import local_cluster  # noqa: F401  (the fixture under test)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
FAKE_PEER = os.path.join(TESTS_DIR, "fake_peer.py")
COMMAND = [sys.executable, FAKE_PEER]
HAS_PROC = os.path.exists(f"/proc/{os.getpid()}/stat")


def child_pids() -> set[int]:
    pids: set[int] = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(path, encoding="ascii") as children:
                pids.update(int(pid) for pid in children.read().split())
        except OSError:  # that thread ended between the listing and the read
            continue
    return pids


def sim_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("sim-")]


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def ask_uuid(address: tuple[str, int]) -> str:
    """The fake peer answers a connection with its uuid."""
    with socket.create_connection(address, timeout=5) as connection:
        return connection.makefile("r").readline().strip()


def read_until(stream_fd: int, marker: bytes, timeout: float = 20.0) -> str:
    """Read a pipe until ``marker`` appears or EOF, with a deadline."""
    data = b""
    deadline = sim.cluster.time.monotonic() + timeout
    while marker not in data:
        remaining = deadline - sim.cluster.time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {marker!r} within {timeout} s; got {data!r}")
        readable, _, _ = select.select([stream_fd], [], [], remaining)
        if readable:
            chunk = os.read(stream_fd, 65536)
            if not chunk:
                break
            data += chunk
    return data.decode()


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test leaves no child process, no sim thread and no live cluster behind."""
    children_before = child_pids()
    yield
    assert sim_threads() == []
    assert child_pids() - children_before == set()
    assert not _LIVE_CLUSTERS


@pytest.fixture
def fake_cluster(local_cluster):  # noqa: F811
    """sim.fixtures.local_cluster with the fake peer as command."""

    def start(n=3, join="tcp", **kwargs):
        return local_cluster(n, join, command=COMMAND, **kwargs)

    return start


# ------------------------------------------------------------------ start per join method


@pytest.mark.parametrize("join", JOIN_METHODS)
def test_every_join_method_starts_n_ready_peers_at_distinct_addresses(fake_cluster, join):
    cluster = fake_cluster(3, join)
    assert len(cluster.peers) == 3
    assert len(set(cluster.addresses())) == 3
    for index, peer in enumerate(cluster.peers):
        assert peer.index == index
        assert peer.alive and peer.ready
        assert peer.address[0] == "127.0.0.1"
        assert peer.pid == peer.popen.pid
        assert peer.cluster_id == cluster.cluster_id
        assert peer.ready_line.startswith(f"grid peer ready {peer.address_text} uuid={peer.uuid}")
        assert ask_uuid(peer.address) == peer.uuid
        assert peer.config["id"] == cluster.cluster_id
        assert peer.config["secret"] == cluster.secret
        assert peer.config["interface"] == "127.0.0.1"
        with open(peer.config_path, encoding="utf-8") as config_file:
            assert json.load(config_file) == peer.config
    assert len({peer.uuid for peer in cluster.peers}) == 3


def test_tcp_join_gives_each_peer_its_own_port_and_everyone_as_members(fake_cluster):
    cluster = fake_cluster(3, "tcp")
    everyone = [peer.address_text for peer in cluster.peers]
    for peer in cluster.peers:
        assert peer.config["join"] == "tcp"
        assert peer.config["port"] == peer.address[1]
        assert peer.config["members"] == everyone


def test_file_join_writes_the_members_file_and_add_appends_to_it(fake_cluster):
    cluster = fake_cluster(2, "file")
    members_file = os.path.join(cluster.directory, "members.txt")
    for peer in cluster.peers:
        assert peer.config["join"] == "tcp"
        assert peer.config["members"] == {"path": members_file}
        assert peer.config["port"] == peer.address[1]

    def listed():
        with open(members_file, encoding="utf-8") as lines:
            return lines.read().split()

    assert listed() == [peer.address_text for peer in cluster.peers]
    added = cluster.add()
    assert listed() == [peer.address_text for peer in cluster.peers]
    assert listed()[-1] == added.address_text


def test_registry_join_uses_a_folder_that_peers_register_in(fake_cluster):
    cluster = fake_cluster(3, "registry")
    registry = os.path.join(cluster.directory, "registry")
    for peer in cluster.peers:
        assert peer.config["join"] == "tcp"
        assert peer.config["port"] == 0
        assert os.path.normpath(peer.config["members"]["path"]) == registry
    entries = sorted(os.listdir(registry))
    assert entries == sorted(f"127.0.0.1_{port}" for _, port in cluster.addresses())
    cluster.stop(1)
    assert f"127.0.0.1_{cluster.peers[1].address[1]}" not in os.listdir(registry)


def test_multicast_join_shares_one_free_group_port_and_merges_overrides(fake_cluster):
    cluster = fake_cluster(2, "multicast", multicast={"timeout_seconds": 0.25}, heartbeat_interval=0.2)
    multicast_ports = set()
    for peer in cluster.peers:
        assert peer.config["join"] == "multicast"
        assert peer.config["port"] == 0
        assert "members" not in peer.config
        assert peer.config["multicast"]["group"] == "224.2.2.3"
        assert peer.config["multicast"]["timeout_seconds"] == 0.25
        assert peer.config["heartbeat_interval"] == 0.2
        multicast_ports.add(peer.config["multicast"]["port"])
    assert len(multicast_ports) == 1 and multicast_ports.pop() > 0


def test_multicast_timeout_defaults_to_one_second(fake_cluster):
    cluster = fake_cluster(1, "multicast")
    assert cluster.peers[0].config["multicast"]["timeout_seconds"] == 1.0


def test_unknown_join_method_is_refused_naming_the_four():
    with pytest.raises(ValueError) as error:
        LocalCluster(1, "carrier-pigeon", command=COMMAND)
    for method in ("tcp", "file", "registry", "multicast"):
        assert method in str(error.value)


def test_a_non_loopback_interface_is_refused(fake_cluster):
    with pytest.raises(ValueError, match="loopback"):
        LocalCluster(1, command=COMMAND, interface="0.0.0.0")
    cluster = fake_cluster(1)
    with pytest.raises(ValueError, match="loopback"):
        cluster.add(interface="10.0.0.3")


# ------------------------------------------------------------------ breaking peers


def test_kill_reaps_the_peer_and_drops_it_from_addresses(fake_cluster):
    cluster = fake_cluster(3)
    victim = cluster.peers[1]
    assert cluster.kill(1) == -signal.SIGKILL
    assert not victim.alive
    assert victim.returncode == -signal.SIGKILL
    assert victim.address not in cluster.addresses()
    assert len(cluster.addresses()) == 2
    assert ask_uuid(cluster.peers[2].address) == cluster.peers[2].uuid
    with pytest.raises(SimError, match="already exited"):
        cluster.kill(1)


def test_kill_with_a_non_fatal_signal_does_not_wait(fake_cluster):
    cluster = fake_cluster(1)
    assert cluster.kill(0, signal.SIGUSR1) is None  # the fake's default action ends it
    cluster.wait_until(lambda: not cluster.peers[0].alive, message="peer 0 to die of SIGUSR1")
    assert cluster.peers[0].returncode == -signal.SIGUSR1


def test_stop_is_a_clean_leave_with_exit_code_zero(fake_cluster):
    cluster = fake_cluster(2)
    assert cluster.stop(0) == 0
    assert "SIGTERM: leaving the cluster" in cluster.log(0)
    assert cluster.addresses() == [cluster.peers[1].address]


def test_stop_kills_a_peer_that_ignores_sigterm(fake_cluster):
    cluster = fake_cluster(1, fake_ignore_sigterm=True)
    with pytest.raises(SimError, match="did not leave within") as error:
        cluster.stop(0, timeout=0.2)
    assert error.value.exit_code == -signal.SIGKILL
    assert not cluster.peers[0].alive


@pytest.mark.skipif(not HAS_PROC, reason="process state is read from /proc")
def test_pause_stops_the_process_and_resume_continues_it(fake_cluster):
    cluster = fake_cluster(2)
    peer = cluster.peers[0]
    cluster.pause(0)
    assert sim.process.process_state(peer.popen.pid) in ("T", "t")
    assert peer.paused and peer.alive
    assert peer.address in cluster.addresses()
    cluster.resume(0)
    assert sim.process.process_state(peer.popen.pid) not in ("T", "t")
    assert not peer.paused
    assert ask_uuid(peer.address) == peer.uuid


def test_kill_of_a_paused_peer_with_sigterm_resumes_it_to_leave(fake_cluster):
    cluster = fake_cluster(1)
    cluster.pause(0)
    assert cluster.kill(0, signal.SIGTERM) == 0


# ------------------------------------------------------------------ add


def test_add_in_tcp_lists_the_live_peers_and_itself(fake_cluster):
    cluster = fake_cluster(2)
    cluster.kill(0)
    added = cluster.add(heartbeat_interval=0.5)
    assert added.index == 2 and added is cluster.peers[2]
    assert added.config["members"] == [cluster.peers[1].address_text, added.address_text]
    assert added.config["port"] == added.address[1]
    assert added.config["heartbeat_interval"] == 0.5
    assert "heartbeat_interval" not in cluster.peers[1].config
    assert cluster.addresses() == [cluster.peers[1].address, added.address]
    assert ask_uuid(added.address) == added.uuid


@pytest.mark.parametrize("join", ["registry", "multicast"])
def test_add_with_shared_discovery_uses_port_zero(fake_cluster, join):
    cluster = fake_cluster(1, join)
    added = cluster.add()
    assert added.config["port"] == 0
    assert added.address != cluster.peers[0].address
    assert ask_uuid(added.address) == added.uuid


def test_a_failed_add_raises_and_leaves_the_cluster_running(fake_cluster):
    cluster = fake_cluster(2)
    with pytest.raises(SimError, match="exited with code 5") as error:
        cluster.add(fake_exit_code=5)
    assert error.value.index == 2 and error.value.exit_code == 5
    assert not cluster.peers[2].alive
    assert len(cluster.addresses()) == 2
    assert cluster.add().index == 3


# ------------------------------------------------------------------ logs and startup failures


def test_log_captures_stderr_and_stdout_including_after_ready(fake_cluster):
    cluster = fake_cluster(1)
    peer = cluster.peers[0]
    cluster.wait_until(lambda: "fake peer: stdout after ready" in cluster.log(0))
    text = cluster.log(0)
    assert f"fake peer {peer.pid}: starting" in text
    assert peer.ready_line in text


def test_a_peer_exiting_before_ready_raises_with_exit_code_and_log_tail():
    with pytest.raises(SimError, match="exited with code 3 before it printed its ready line") as error:
        LocalCluster(3, command=COMMAND, fake_exit_code=3, fake_log_lines=30)
    tail = error.value.log_tail.splitlines()
    assert error.value.exit_code == 3
    assert len(tail) == 20
    assert tail[0].endswith("noise line 11")
    assert tail[-1].endswith("failing on purpose before ready with exit code 3")
    assert tail[-1] in str(error.value)
    assert not os.path.exists(os.path.dirname(error.value.log_path))


def test_a_missed_startup_deadline_raises_and_stops_every_peer():
    # Long enough for the fake to start and log its line on a loaded machine, short enough to wait out.
    with pytest.raises(SimError, match=r"did not print its ready line within 2 s") as error:
        LocalCluster(2, command=COMMAND, startup_timeout=2.0, fake_hang_before_ready=True)
    assert error.value.exit_code is None
    assert "hanging before ready on purpose" in error.value.log_tail


def test_a_missing_command_raises_and_cleans_up():
    with pytest.raises(FileNotFoundError):
        LocalCluster(2, command=[os.path.join(TESTS_DIR, "no-such-peer-program")])


# ------------------------------------------------------------------ terminate


def test_terminate_leaves_no_process_thread_or_directory_and_is_idempotent():
    cluster = LocalCluster(3, command=COMMAND)
    cluster.pause(1)
    pids = [peer.popen.pid for peer in cluster.peers]
    assert len(sim_threads()) == 3
    cluster.terminate()
    assert [peer.returncode for peer in cluster.peers] == [0, 0, 0]  # the paused one left cleanly too
    assert not any(pid in child_pids() for pid in pids)
    assert sim_threads() == []
    assert not os.path.exists(cluster.directory)
    cluster.terminate()
    with pytest.raises(SimError, match="terminated"):
        cluster.kill(0)
    with pytest.raises(SimError, match="terminated"):
        cluster.add()


def test_terminate_kills_peers_that_ignore_sigterm():
    cluster = LocalCluster(1, command=COMMAND, fake_ignore_sigterm=True)
    cluster.terminate(timeout=0.2)
    assert cluster.peers[0].returncode == -signal.SIGKILL


def test_context_manager_terminates():
    with LocalCluster(1, command=COMMAND) as cluster:
        assert os.path.isdir(cluster.directory)
        assert cluster in _LIVE_CLUSTERS
    assert not os.path.exists(cluster.directory)
    assert not cluster.peers[0].alive


def test_a_forgotten_cluster_is_terminated_at_interpreter_exit():
    script = textwrap.dedent(
        f"""
        import sim
        cluster = sim.LocalCluster(1, command={COMMAND!r})
        print(cluster.peers[0].pid, cluster.directory, flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    pid_text, directory = result.stdout.split()
    assert not pid_exists(int(pid_text))
    assert not os.path.exists(directory)


# ------------------------------------------------------------------ helpers for tests and clients


def test_wait_until_returns_the_truthy_value_or_raises_with_the_message(fake_cluster):
    cluster = fake_cluster(0)
    calls = []

    def third_call():
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    assert cluster.wait_until(third_call, interval=0.001) == 3
    with pytest.raises(TimeoutError, match=r"peers to agree: still not true after 0.05 s \(last value 0\)"):
        cluster.wait_until(lambda: 0, timeout=0.05, interval=0.01, message="peers to agree")
    with pytest.raises(TimeoutError, match="condition"):
        sim.wait_until(lambda: [], timeout=0.01)


def test_config_is_a_client_config_for_the_live_peers(fake_cluster):
    cluster = fake_cluster(3)
    cluster.kill(0)
    assert cluster.config() == {
        "id": cluster.cluster_id,
        "secret": cluster.secret,
        "join": "tcp",
        "members": [cluster.peers[1].address_text, cluster.peers[2].address_text],
        "interface": "127.0.0.1",
    }
    assert cluster.config(2)["members"] == [cluster.peers[2].address_text]
    timed = fake_cluster(1, failure_timeout=1.5, heartbeat_interval=0.2, workers=3)
    assert timed.config()["failure_timeout"] == 1.5 and timed.config()["heartbeat_interval"] == 0.2
    assert "workers" not in timed.config(), "only the timings a client needs"
    with pytest.raises(SimError, match="already exited"):
        cluster.config(0)
    path = cluster.write_client_config()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, encoding="utf-8") as client_file:
        assert json.load(client_file) == cluster.config()


def test_connect_passes_the_client_config_to_grid_connect(fake_cluster, monkeypatch):
    cluster = fake_cluster(1)
    received = []
    fake_grid = types.SimpleNamespace(connect=lambda config: received.append(config) or "handle")
    monkeypatch.setitem(sys.modules, "grid", fake_grid)
    assert cluster.connect() == "handle"
    assert received == [cluster.config()]


def test_a_seed_makes_cluster_id_and_secret_reproducible():
    with LocalCluster(0, seed=7) as first, LocalCluster(0, seed=7) as second:
        assert (first.cluster_id, first.secret) == (second.cluster_id, second.secret)
        assert first.directory != second.directory
    with LocalCluster(0, seed=8) as other, LocalCluster(0) as unseeded, LocalCluster(0) as unseeded_again:
        assert other.cluster_id != first.cluster_id
        assert unseeded.secret != unseeded_again.secret
        assert unseeded.cluster_id.startswith("sim-")


def test_the_peer_command_comes_from_sim_peer_command(monkeypatch):
    monkeypatch.setenv("SIM_PEER_COMMAND", shlex.join(COMMAND))
    with LocalCluster(1) as cluster:
        assert cluster.command == COMMAND
        assert ask_uuid(cluster.peers[0].address) == cluster.peers[0].uuid
    monkeypatch.delenv("SIM_PEER_COMMAND")
    assert sim.process.default_peer_command() == [sys.executable, "-m", "grid", "peer"]


# ------------------------------------------------------------------ python -m sim


def test_parse_settings_reads_json_values_and_dotted_keys():
    assert parse_settings(
        ["heartbeat_interval=0.2", "multicast.timeout_seconds=0.5", "multicast.ttl=1", "id=demo", "members=[]"]
    ) == {
        "heartbeat_interval": 0.2,
        "multicast": {"timeout_seconds": 0.5, "ttl": 1},
        "id": "demo",
        "members": [],
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_settings(["heartbeat_interval"])


def test_sim_up_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sim_main(["up", "2", "--join", "carrier-pigeon"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        sim_main(["up", "2", "--set", "no-equals-sign"])
    assert "KEY=VALUE" in capsys.readouterr().err


def test_sim_up_prints_addresses_and_client_config_then_stops_on_sigterm():
    process = subprocess.Popen(
        [sys.executable, "-m", "sim", "up", "2", "--command", shlex.join(COMMAND), "--set", "heartbeat_interval=0.2"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    try:
        output = read_until(process.stdout.fileno(), b"stops the cluster")
        lines = output.splitlines()
        peer_lines = [line.split() for line in lines if line.startswith("peer ")]
        assert len(peer_lines) == 2
        addresses = [fields[2] for fields in peer_lines]
        pids = [int(fields[4].removeprefix("pid=")) for fields in peer_lines]
        assert len(set(addresses)) == 2 and all(a.startswith("127.0.0.1:") for a in addresses)
        (client_line,) = [line for line in lines if line.startswith("client config: ")]
        client_path = client_line.removeprefix("client config: ")
        with open(client_path, encoding="utf-8") as client_file:
            assert json.load(client_file)["members"] == addresses
        with open(os.path.join(os.path.dirname(client_path), "peer-0.json"), encoding="utf-8") as peer_file:
            assert json.load(peer_file)["heartbeat_interval"] == 0.2
        assert any(line.startswith(f"connect: GRID={client_path} ") for line in lines)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert "sim: stopped" in read_until(process.stdout.fileno(), b"sim: stopped")
        assert not any(pid_exists(pid) for pid in pids)
        assert not os.path.exists(os.path.dirname(client_path))
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()
