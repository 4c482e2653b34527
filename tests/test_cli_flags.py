"""``python -m grid --version`` and the ``peer`` flags for the common config keys."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import signal
import subprocess
import sys

import pytest

import grid
from grid import cli
from grid.cluster.config import Config
from grid.cluster.config_tables import MembersPath
from grid.errors import ConfigError
from tests.conftest import wait_for
from tests.test_cli_code import COMMAND_WAIT, environment, grid_command, lines_by_member

READY_WAIT = 30  # a member: interpreter start, bind, form a cluster of its own


def isolated(tmp_path, **extra) -> dict:
    """The environment of a grid command that finds no config of the user's (no ~/.grid, GRID)."""
    env = environment(HOME=str(tmp_path), **extra)
    env.pop("PYTHONUNBUFFERED", None)  # what is under test is the member's own buffering
    return env


def secret_file(tmp_path, text="flag-secret\n", mode=0o600) -> str:
    path = tmp_path / "secret"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


@contextlib.contextmanager
def running_peer(tmp_path, *flags, name="peer"):
    """``python -m grid peer FLAGS`` with stdout and stderr in files; yields (process, stdout path, stderr path)."""
    out_path, err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "grid", "peer", *flags], stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL, cwd=tmp_path, env=isolated(tmp_path))
    try:
        yield process, out_path, err_path
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(COMMAND_WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ready_lines(process, out_path, count=1) -> list[str]:
    def found():
        lines = [line for line in out_path.read_text().splitlines() if line.startswith("grid peer ready ")]
        assert process.poll() is None or len(lines) >= count, f"the peer exited with {process.returncode}"
        return lines if len(lines) >= count else None

    return wait_for(found, READY_WAIT, f"{count} ready line(s) in {out_path}")


def field(line: str, name: str) -> str:
    return line.split(f"{name}=")[1].split()[0]


def client_config(tmp_path, address: str, cluster_id: str, secret_path: str) -> str:
    path = tmp_path / "client.json"
    path.write_text(f'{{"id": "{cluster_id}", "join": "tcp", "members": ["{address}"], '
                    f'"interface": "127.0.0.1", "secret_file": "{secret_path}", "join_timeout": 0.5}}')
    return str(path)


# ------------------------------------------------------------------ --version


def test_version_prints_the_distribution_version(tmp_path):
    done = grid_command("--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"hazelgrid {importlib.metadata.version('hazelgrid')}\n"
    assert grid.__version__ == importlib.metadata.version("hazelgrid")


def test_version_falls_back_to_the_package_constant(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.hazelgrid_version() == grid.__version__


# ------------------------------------------------------------------ flags over the config


def test_each_flag_overrides_its_config_key(tmp_path):
    base = Config(id="from-file", join="multicast", port=5701, interface="127.0.0.1", secret="in-config")
    config = cli.config_with_flags(base, port="6801", cluster_id="from-flag", members="127.0.0.1:6000, 127.0.0.2",
                                   interface="127.0.0.3", secret_file=secret_file(tmp_path))
    assert (config.id, config.port, config.interface) == ("from-flag", 6801, "127.0.0.3")
    assert config.join == "tcp", "--members alone means join = tcp"
    assert config.members == ["127.0.0.1:6000", "127.0.0.2"]
    assert config.secret is None and config.resolved_secret({}) == "flag-secret", "the file, stripped"
    assert "--port 6801" in config.source, "the source names the flags"
    assert cli.config_with_flags(base) == base, "no flag: the config as it was"


def test_join_flag_takes_every_join_method(tmp_path):
    registry = tmp_path / "registry"
    registry.mkdir()
    with_path = Config(join="tcp", members={"path": str(registry)})
    assert cli.config_with_flags(with_path, join="multicast").members is None, "the method wins over the path"
    assert cli.config_with_flags(Config(), join="aws").join == "aws"
    kept = cli.config_with_flags(Config(join="multicast", members=["127.0.0.1:7000"]), join="tcp")
    assert (kept.join, kept.members) == ("tcp", ["127.0.0.1:7000"])
    folder = cli.config_with_flags(Config(), join=f"registry:{registry}")
    assert folder.members == MembersPath(str(registry) + os.sep)
    hosts = cli.config_with_flags(Config(), join=f"file:{tmp_path / 'hosts.txt'}")
    assert hosts.members == MembersPath(str(tmp_path / "hosts.txt"))


@pytest.mark.parametrize(("flags", "words"), [
    ({"port": "70000"}, ["--port 70000", "'port'", "out of range", "0..65535"]),
    ({"port": "many"}, ["--port many", "expected an integer"]),
    ({"cluster_id": " "}, ["--id", "'id'", "empty"]),
    ({"join": "tpc"}, ["--join tpc", "did you mean 'tcp'", "registry:PATH"]),
    ({"join": "registry"}, ["--join registry", "registry:PATH"]),
    ({"join": "multicast", "members": "127.0.0.1:7000"}, ["--members", "--join tcp"]),
    ({"members": "127.0.0.1:99999"}, ["--members 127.0.0.1:99999", "'members'"]),
    ({"interface": "127.0.0.1:5701"}, ["--interface 127.0.0.1:5701", "'interface'", "not an IP address"]),
])
def test_a_bad_flag_fails_the_config_check_naming_the_flag(flags, words):
    with pytest.raises(ConfigError) as info:
        cli.config_with_flags(Config(), **flags)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_join_file_refuses_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="registry:"):
        cli.config_with_flags(Config(), join=f"file:{tmp_path}")


@pytest.mark.parametrize(("case", "words"), [
    ("missing", ["--secret-file", "cannot read", "No such file"]),
    ("empty", ["--secret-file", "is empty"]),
    ("loose", ["--secret-file", "0644", "chmod 600"]),
    ("group", ["--secret-file", "0640", "chmod 600"]),
])
def test_secret_file_flag_refuses_missing_empty_and_loose_files(tmp_path, case, words):
    path = {"missing": lambda: str(tmp_path / "absent"),
            "empty": lambda: secret_file(tmp_path, "\n"),
            "loose": lambda: secret_file(tmp_path, mode=0o644),
            "group": lambda: secret_file(tmp_path, mode=0o640)}[case]()
    with pytest.raises(ConfigError) as info:
        cli.config_with_flags(Config(), secret_file=path)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_peer_refuses_a_bad_flag_before_it_starts(tmp_path):
    for procs in ("1", "2"):
        done = subprocess.run([sys.executable, "-m", "grid", "peer", "--procs", procs, "--interface", "127.0.0.1",
                               "--secret-file", secret_file(tmp_path, mode=0o644)], capture_output=True, text=True,
                              timeout=COMMAND_WAIT, cwd=tmp_path, env=isolated(tmp_path), stdin=subprocess.DEVNULL)
        assert done.returncode == 2, (procs, done.stderr)
        assert "--secret-file" in done.stderr and "chmod 600" in done.stderr
        assert "grid peer ready" not in done.stdout


# ------------------------------------------------------------------ real members


@pytest.mark.slow
def test_members_started_by_flags_alone_form_a_cluster(tmp_path):
    secret = secret_file(tmp_path)
    common = ["--procs", "1", "--id", "flagged", "--interface", "127.0.0.1", "--secret-file", secret]
    with running_peer(tmp_path, *common, "--port", "0", "--join", "tcp", name="first") as (first, out, _):
        address = ready_lines(first, out)[0].split()[3]
        assert field(ready_lines(first, out)[0], "cluster") == "flagged"
        with running_peer(tmp_path, *common, "--port", "0", "--members", address, name="second") as (second, out2, _):
            ready_lines(second, out2)
            done = grid_command("members", "--config", client_config(tmp_path, address, "flagged", secret),
                                cwd=tmp_path, env=isolated(tmp_path))
            assert done.returncode == 0, done.stderr
            pids = {field(line, "pid") for line in done.stdout.splitlines()}
            assert pids == {str(first.pid), str(second.pid)}, done.stdout


@pytest.mark.slow
def test_log_file_gets_the_log_and_the_supervisor_passes_every_flag_on(tmp_path):
    secret = secret_file(tmp_path)
    log_file = tmp_path / "members.log"
    with running_peer(tmp_path, "--procs", "2", "--id", "supervised", "--port", "0", "--join", "tcp",
                      "--interface", "127.0.0.1", "--secret-file", secret, "--log-file", str(log_file),
                      "--log-level", "INFO") as (supervisor, out, err):
        lines = ready_lines(supervisor, out, count=2)
        assert {field(line, "cluster") for line in lines} == {"supervised"}
        assert all(line.split()[3].startswith("127.0.0.1:") for line in lines)
        pids = {field(line, "pid") for line in lines}
        wait_for(lambda: all(f" {pid} grid." in log_file.read_text() for pid in pids), 10,
                 "both members' log lines in the log file")
        assert " grid.membership " not in err.read_text(), "the log goes to the file, not to stderr"
    assert supervisor.returncode == 0


@pytest.mark.slow
def test_a_members_print_reaches_its_stdout_file_while_it_runs(tmp_path):
    secret = secret_file(tmp_path)
    with running_peer(tmp_path, "--procs", "1", "--id", "prints", "--port", "0", "--join", "tcp",
                      "--interface", "127.0.0.1", "--secret-file", secret) as (member, out, _):
        address = ready_lines(member, out)[0].split()[3]
        script = tmp_path / "hello.py"
        script.write_text("print('hello from a member', flush=False)\n")
        done = grid_command("exec", str(script), "--config", client_config(tmp_path, address, "prints", secret),
                            cwd=tmp_path, env=isolated(tmp_path))
        assert done.returncode == 0, done.stderr
        assert list(lines_by_member(done.stdout).values()) == ["ok"]
        wait_for(lambda: "hello from a member" in out.read_text(), 10, "the print in the member's stdout file")
        assert member.poll() is None, "seen while the member still runs, not at its exit"
