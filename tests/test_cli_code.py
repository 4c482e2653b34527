"""``python -m grid exec FILE``, ``eval EXPR`` and ``peer --import MODULE`` from the shell."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND_WAIT = 60  # a grid command: interpreter start, connect, answer


def environment(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("GRID", None)
    env.pop("GRID_SECRET", None)
    env.update(extra)
    return env


def grid_command(*args, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grid", *args], capture_output=True, text=True,
                          timeout=COMMAND_WAIT, cwd=cwd, env=env or environment(), stdin=subprocess.DEVNULL)


def lines_by_member(stdout: str) -> dict[str, str]:
    rows = [line.split("\t", 1) for line in stdout.splitlines()]
    assert all(len(row) == 2 for row in rows), stdout
    return dict(rows)


# ------------------------------------------------------------------ exec and eval


def test_exec_defines_what_eval_then_sees_on_every_member(local_cluster, tmp_path):
    cluster = local_cluster(2)
    config = cluster.write_client_config()
    script = tmp_path / "tools.py"
    script.write_text("import os\n\ndef triple(x):\n    return 3 * x\n\nloaded_by = os.getpid()\n")
    done = grid_command("exec", str(script), "--config", config, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    addresses = {peer.address_text for peer in cluster.peers}
    assert lines_by_member(done.stdout) == {address: "ok" for address in addresses}

    done = grid_command("eval", "(triple(14), loaded_by)", "--config", config, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert lines_by_member(done.stdout) == {peer.address_text: repr((42, peer.pid)) for peer in cluster.peers}


def readme_shell_block(containing: str) -> str:
    """The README's ``sh`` code block that holds ``containing``."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
        blocks = re.findall(r"^```sh\n(.*?)^```", readme.read(), re.S | re.M)
    return next(block for block in blocks if containing in block)


@pytest.mark.slow
def test_the_readme_shell_example_works_as_typed(local_cluster, tmp_path):
    cluster = local_cluster(2, join_timeout=0.3)
    block = readme_shell_block("python -m grid exec")
    # All but the interactive console (tests/test_console.py), run in order as a shell would.
    script = "\n".join(line for line in block.splitlines() if not line.startswith("python -m grid console"))
    bin_folder = tmp_path / "bin"  # `python` in the README is this interpreter
    bin_folder.mkdir()
    (bin_folder / "python").symlink_to(sys.executable)
    env = environment(GRID=cluster.write_client_config(), HOME=str(tmp_path),
                      PATH=os.pathsep.join([str(bin_folder), os.environ.get("PATH", "")]))
    done = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, timeout=3 * COMMAND_WAIT,
                          cwd=tmp_path, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, (script, done.stdout, done.stderr)
    outputs = [line.split("\t", 1) for line in done.stdout.splitlines()]
    addresses = {peer.address_text for peer in cluster.peers}
    assert [dict(outputs[i:i + 2]) for i in range(0, len(outputs), 2)] == [
        {address: value for address in addresses} for value in ("ok", "1", "1")], done.stdout


def test_exec_and_eval_in_a_named_module(local_cluster, tmp_path):
    cluster = local_cluster(1, join_timeout=0.3)
    config = cluster.write_client_config()
    script = tmp_path / "setup.py"
    script.write_text("greeting = 'hi from ' + __name__\n")
    done = grid_command("exec", str(script), "--module", "tools.text", "--config", config, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = grid_command("eval", "greeting", "--module", "tools.text", "--config", config, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{cluster.peers[0].address_text}\t'hi from tools.text'\n"
    done = grid_command("eval", "'greeting' in globals()", "--config", config, cwd=tmp_path)
    assert done.stdout.split("\t")[1].strip() == "False", "module user is another namespace"


def test_a_failure_on_one_member_names_it_with_its_traceback(local_cluster, tmp_path):
    cluster = local_cluster(2)
    config = cluster.write_client_config()
    failing, fine = cluster.peers
    expression = f"__import__('os').getpid() if __import__('os').getpid() != {failing.pid} else 1 / 0"
    done = grid_command("eval", expression, "--config", config, cwd=tmp_path)
    assert done.returncode == 1
    assert lines_by_member(done.stdout) == {fine.address_text: repr(fine.pid)}, "the success is kept"
    assert f"{failing.address_text}\tFAILED\tZeroDivisionError" in done.stderr
    assert "Traceback (most recent call last):" in done.stderr, "the remote traceback is shown"
    assert "failed on 1 of 2 members" in done.stderr

    script = tmp_path / "half.py"
    script.write_text(f"import os\n\nif os.getpid() == {failing.pid}:\n    raise RuntimeError('not here')\n")
    done = grid_command("exec", str(script), "--config", config, cwd=tmp_path)
    assert done.returncode == 1
    assert lines_by_member(done.stdout) == {fine.address_text: "ok"}
    assert f"{failing.address_text}\tFAILED\tRuntimeError: not here" in done.stderr
    assert "half.py" in done.stderr and "raise RuntimeError('not here')" in done.stderr


def test_a_member_without_allow_code_refuses_exec(local_cluster, tmp_path):
    cluster = local_cluster(1, allow_code=False, join_timeout=0.3)
    script = tmp_path / "x.py"
    script.write_text("x = 1\n")
    done = grid_command("exec", str(script), "--config", cluster.write_client_config(), cwd=tmp_path)
    assert done.returncode == 1
    assert "CodeNotAllowed" in done.stderr and "allow_code" in done.stderr


def test_exec_of_a_missing_file_says_so(tmp_path):
    config = tmp_path / "grid.json"  # no member: it fails on the file before connecting
    config.write_text(json.dumps({"id": "nobody", "join": "tcp", "members": [], "interface": "127.0.0.1",
                                  "join_timeout": 0.2}))
    done = grid_command("exec", str(tmp_path / "absent.py"), "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert "cannot read" in done.stderr and "absent.py" in done.stderr


def test_eval_with_a_syntax_error_fails_before_sending(local_cluster, tmp_path):
    cluster = local_cluster(1, join_timeout=0.3)
    done = grid_command("eval", "1 +", "--config", cluster.write_client_config(), cwd=tmp_path)
    assert done.returncode == 2
    assert "SyntaxError" in done.stderr


def test_eval_without_a_cluster_says_so(tmp_path):
    config = tmp_path / "grid.json"
    config.write_text(json.dumps({"id": "nobody", "join": "tcp", "members": [], "interface": "127.0.0.1",
                                  "join_timeout": 0.2, "handshake_timeout": 0.5}))
    done = grid_command("eval", "1", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert "grid eval: cannot reach any member" in done.stderr


# ------------------------------------------------------------------ peer --import


@pytest.fixture
def marker_module(tmp_path):
    """A module that, when imported, writes a file named by the importing process's pid."""
    markers = tmp_path / "markers"
    markers.mkdir()
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "grid_marker_mod.py").write_text(
        f"import os\nopen(os.path.join({str(markers)!r}, str(os.getpid())), 'w').close()\n")
    (modules / "grid_marker_other.py").write_text("imported = True\n")
    return modules, markers


def test_peer_imports_modules_before_it_joins(local_cluster, marker_module, tmp_path, monkeypatch):
    modules, markers = marker_module
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(modules), *filter(None, [os.environ.get("PYTHONPATH")])]))
    command = [sys.executable, "-m", "grid", "peer", "--import", "grid_marker_mod", "--import", "grid_marker_other"]
    cluster = local_cluster(1, command=command, join_timeout=0.3)
    peer = cluster.peers[0]
    assert os.listdir(markers) == [str(peer.pid)], "imported before the ready line"
    done = grid_command("eval", "sorted(m for m in __import__('sys').modules if m.startswith('grid_marker'))",
                        "--config", cluster.write_client_config(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{peer.address_text}\t['grid_marker_mod', 'grid_marker_other']\n"


def test_supervised_members_each_import_the_modules(marker_module, tmp_path):
    modules, markers = marker_module
    config = tmp_path / "grid.json"
    config.write_text(json.dumps({"id": "imports", "secret": "s", "join": "tcp", "members": [],
                                  "port": 0, "interface": "127.0.0.1", "join_timeout": 0.2}))
    env = environment(PYTHONPATH=os.pathsep.join([str(modules), ROOT]))
    supervisor = subprocess.Popen([sys.executable, "-m", "grid", "peer", "--procs", "2", "--import", "grid_marker_mod",
                                   "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, cwd=tmp_path, env=env)
    try:
        ready = [supervisor.stdout.readline() for _ in range(2)]
        assert all(line.startswith("grid peer ready ") for line in ready), ready
        pids = {line.split("pid=")[1].split()[0] for line in ready}
        wait_for(lambda: set(os.listdir(markers)) == pids, 10, "both members' markers")
    finally:
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(COMMAND_WAIT) == 0
        supervisor.stdout.close()


def test_peer_with_a_module_it_cannot_import_says_so(tmp_path):
    config = tmp_path / "grid.json"
    config.write_text(json.dumps({"id": "badimport", "join": "tcp", "members": [], "port": 0,
                                  "interface": "127.0.0.1", "join_timeout": 0.2}))
    done = subprocess.run([sys.executable, "-m", "grid", "peer", "--procs", "1", "--import", "no_such_module_here",
                           "--config", str(config)], capture_output=True, text=True, timeout=COMMAND_WAIT,
                          cwd=tmp_path, env=environment(), stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert "'imports'" in done.stderr and "no_such_module_here" in done.stderr
    assert "grid peer ready" not in done.stdout
