"""The remote console: ConsoleSessions over a real transport pair, and ``python -m grid console``
driven through a pty (pexpect) against a sim cluster.

In-process tests put a fresh ``user`` module into ``sys.modules`` (restored afterwards), since
the console's namespace is that process-wide module.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import threading
import types

import pexpect
import pytest

import grid.code.console
from grid.net import messaging
from grid.cluster.config import load_config
from grid.code.console import ConsoleSessions
from grid.console_client import RemoteConsole, SessionEnded, run_console
from grid.errors import CodeNotAllowed, GridError
from grid.cluster.members import Member
from grid.net.transport import Transport
from tests.conftest import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "console-secret"
CLUSTER = "console-test"
WAIT = 10.0  # deadline for what takes milliseconds; reached only when a test fails
PEXPECT_WAIT = 30  # a console process: interpreter start, connect, answer


# ------------------------------------------------------------------ in-process: a member's console


class ConsoleMember:
    """A Transport + Router + ConsoleSessions: the console part of a member, nothing else."""

    def __init__(self, *, allow_code: bool = True, link_check_interval: float = 2.0):
        self.router = messaging.Router()
        self.transport = Transport(cluster_id=CLUSTER, secret=SECRET, info={"uuid": "m", "role": "member"},
                                   on_frame=self.router.on_frame, name="grid-io-console-test")
        self.address = self.transport.listen("127.0.0.1", 0)
        member = Member(uuid="m", address=self.address, pid=os.getpid(), hostname="testhost")
        self.sessions = ConsoleSessions(self.router, allow_code=allow_code, member=member,
                                        link_check_interval=link_check_interval)
        self.config = load_config({"id": CLUSTER, "secret": SECRET})

    def console(self) -> tuple[RemoteConsole, list[str]]:
        output: list[str] = []
        return RemoteConsole(self.config, self.address, on_output=output.append), output

    def close(self) -> None:
        self.sessions.close()
        self.transport.close()


@pytest.fixture
def user_module(monkeypatch):
    module = types.ModuleType("user")
    monkeypatch.setitem(sys.modules, "user", module)
    return module


@pytest.fixture
def member(user_module):
    made = []

    def make(**kwargs) -> ConsoleMember:
        made.append(ConsoleMember(**kwargs))
        return made[-1]

    yield make
    for one in made:
        one.close()
    assert not isinstance(sys.stdout, grid.code.console._RoutedStream), "the streams are put back"


def test_a_session_runs_blocks_prints_results_and_survives_an_exception(member, user_module):
    console, output = member().console()
    with console:
        assert "member 127.0.0.1:" in console.banner and "testhost" in console.banner
        assert console.push("def double(x):") is True
        assert console.push("    print('doubling', x)") is True
        assert console.push("    return 2 * x") is True
        assert console.push("") is False
        assert console.push("double(21)") is False
        assert "".join(output) == "doubling 21\n42\n"
        output.clear()
        assert console.push("1 / 0") is False
        text = "".join(output)
        assert text.startswith("Traceback (most recent call last):") and "ZeroDivisionError" in text
        output.clear()
        assert console.push("x = double(1)") is False
        assert console.push("x") is False
        assert "".join(output) == "doubling 1\n2\n", "the session goes on after the exception"
    assert user_module.double(3) == 6, "the console's namespace is the module `user`"


def test_the_console_sees_what_the_user_module_holds(member, user_module):
    user_module.defined_by_exec_all = lambda: "from exec_all"
    console, output = member().console()
    with console:
        console.push("defined_by_exec_all()")
        console.push("__name__")
    assert "".join(output) == "'from exec_all'\n'user'\n"


def test_syntax_errors_and_input_are_reported_not_fatal(member):
    console, output = member().console()
    with console:
        console.push("def (:")
        assert "SyntaxError" in "".join(output)
        output.clear()
        console.push("input('name? ')")
        assert "EOFError: the grid console has no standard input" in "".join(output)
        output.clear()
        console.push("'still here'")
        assert "".join(output) == "'still here'\n"


def test_only_the_console_thread_output_is_captured(member, capsys):
    console, output = member().console()
    with console:
        # Code started from the console on another thread prints to the member's own stdout.
        console.push("import threading; t = threading.Thread(target=print, args=('elsewhere',)); t.start(); t.join()")
        console.push("print('here')")
        print("test thread")
    assert "".join(output) == "here\n"
    captured = capsys.readouterr().out.splitlines()
    assert "elsewhere" in captured and "test thread" in captured and "here" not in captured


def test_exit_ends_the_session_with_its_code(member):
    one = member()
    console, _ = one.console()
    with console:
        with pytest.raises(SessionEnded) as ended:
            console.push("exit(4)")
        assert ended.value.exit_code == 4
        wait_for(lambda: one.sessions.active == 0, WAIT, "the session to end")
    assert not sys.stdin.closed, "exit() closes the session's stdin, never the member's"


def test_interrupt_stops_running_code_and_the_session_continues(member, user_module):
    console, output = member().console()
    user_module.started = threading.Event()
    outcome = []
    with console:
        assert console.push("while True: started.set()") is True
        pusher = threading.Thread(target=lambda: outcome.append(console.push("")))
        pusher.start()
        assert user_module.started.wait(WAIT)
        assert console.interrupt() is True
        pusher.join(WAIT)
        assert outcome == [False]
        assert "KeyboardInterrupt" in "".join(output)
        output.clear()
        console.push("1 + 1")
        assert "".join(output) == "2\n"
        assert console.interrupt() is False, "nothing runs now"


def test_closing_the_member_ends_a_running_session(member, user_module):
    one = member()
    console, _ = one.console()
    user_module.started = threading.Event()
    outcome = []

    def push():
        try:
            outcome.append(console.push(""))
        except GridError as exc:  # SessionEnded, or the link closing first
            outcome.append(exc)

    with console:
        assert console.push("while True: started.set()") is True
        pusher = threading.Thread(target=push)
        pusher.start()
        assert user_module.started.wait(WAIT)
        one.sessions.close()  # interrupts the loop and joins the session thread
        pusher.join(WAIT)
        assert len(outcome) == 1 and isinstance(outcome[0], GridError)
        assert not session_threads()


def test_a_session_whose_link_closes_is_cleaned_up(member):
    one = member(link_check_interval=0.01)
    console, _ = one.console()
    console.push("x = 1")
    assert one.sessions.active == 1
    console._transport.close()  # the client vanishes without saying goodbye
    wait_for(lambda: one.sessions.active == 0, WAIT, "the member to end the orphaned session")
    wait_for(lambda: not session_threads(), WAIT, "the session thread to end")


def test_a_session_belongs_to_its_link(member):
    one = member()
    first, _ = one.console()
    second, _ = one.console()
    with first, second:
        with pytest.raises(GridError, match="no console session"):
            messaging.request(second._conn, "console.push", {"session": first._session, "source": "1"}).result(WAIT)


def test_a_member_without_allow_code_refuses_every_console_request(member):
    one = member(allow_code=False)
    with pytest.raises(CodeNotAllowed, match="allow_code = false.*set `allow_code = true`"):
        one.console()
    transport = Transport(cluster_id=CLUSTER, secret=SECRET, info={"uuid": "c", "role": "client"},
                          name="grid-io-console-client")
    try:
        conn = transport.connect(one.address).result(WAIT)
        for message_type in ("console.open", "console.push", "console.interrupt", "console.close"):
            with pytest.raises(CodeNotAllowed):
                messaging.request(conn, message_type, {"session": 1, "source": "1"}).result(WAIT)
    finally:
        transport.close()
    assert one.sessions.active == 0


def test_run_console_reads_a_stream_and_returns_the_exit_code(member):
    one = member()
    address = "%s:%d" % one.address
    out = io.StringIO()
    script = "for i in range(2):\n    print('line', i)\n\nexit(3)\nprint('never')\n"
    assert run_console(one.config, address, stdin=io.StringIO(script), stdout=out) == 3
    text = out.getvalue()
    assert text.splitlines()[0].startswith("grid console on member " + address)
    assert ">>> ... ... line 0\nline 1\n>>> " in text
    assert "never" not in text
    out = io.StringIO()
    assert run_console(one.config, address, stdin=io.StringIO("6 * 7\n"), stdout=out) == 0, "end of input"
    assert "42" in out.getvalue()


def test_run_console_explains_a_refusal_and_an_unreachable_member(member, capsys):
    refusing = member(allow_code=False)
    assert run_console(refusing.config, "%s:%d" % refusing.address, stdin=io.StringIO(""),
                       stdout=io.StringIO()) == 3
    assert "allow_code = false" in capsys.readouterr().err
    address = "127.0.0.1:%d" % unused_port()
    assert run_console(refusing.config, address, stdin=io.StringIO(""), stdout=io.StringIO()) == 2
    error = capsys.readouterr().err
    assert f"cannot open a console on {address}" in error and "refused" in error.lower()


def session_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if re.fullmatch(r"grid-console-\d+", t.name) and t.is_alive()]


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ python -m grid console, in a pty


def console_environment(home) -> dict:
    environment = dict(os.environ, HOME=str(home), PYTHONPATH=ROOT, TERM="dumb")
    environment.pop("GRID", None)
    environment.pop("GRID_SECRET", None)
    return environment


def spawn_console(args, home) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "grid", "console", *args], cwd=str(home), env=console_environment(home),
                         encoding="utf-8", timeout=PEXPECT_WAIT, echo=False)


def test_console_session_in_a_terminal(local_cluster, tmp_path):
    cluster = local_cluster(2)
    with cluster.connect() as client:
        master_address = client.master().address
    master = next(peer for peer in cluster.peers if peer.address == master_address)
    child = spawn_console(["--config", cluster.write_client_config()], tmp_path)
    try:
        child.expect(r"grid console on member (\S+) \(pid (\d+), host ")
        assert child.match.group(1) == master.address_text, "without ADDRESS it opens on the master"
        assert int(child.match.group(2)) == master.pid
        child.expect_exact(">>> ")
        child.sendline("def greet(name):")
        child.expect_exact("... ")
        child.sendline("    return 'hello ' + name")
        child.expect_exact("... ")
        child.sendline("")
        child.expect_exact(">>> ")
        child.sendline("print(greet('grid'))")
        child.expect_exact("hello grid")
        child.expect_exact(">>> ")
        child.sendline("{}['missing']")
        child.expect_exact("Traceback (most recent call last):")
        child.expect_exact("KeyError: 'missing'")
        child.expect_exact(">>> ")
        child.sendline("for i in (")  # Ctrl-C drops the unfinished block
        child.expect_exact("... ")
        child.sendintr()
        child.expect_exact("KeyboardInterrupt")
        child.expect_exact(">>> ")
        child.sendline("import os; os.getpid()")
        child.expect(r"(\d+)\r\n>>> ")
        assert int(child.match.group(1)) == master.pid
        child.sendline("exit()")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    history = (tmp_path / ".grid" / "console_history").read_text()
    assert "print(greet('grid'))" in history


def test_console_on_a_named_member_ends_with_ctrl_d(local_cluster, tmp_path):
    cluster = local_cluster(2)
    other = cluster.peers[1]
    child = spawn_console([other.address_text, "--config", cluster.write_client_config()], tmp_path)
    try:
        child.expect_exact(f"grid console on member {other.address_text} (pid {other.pid}")
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_console_on_a_member_without_allow_code_is_refused(local_cluster, tmp_path):
    cluster = local_cluster(1, allow_code=False, join_timeout=0.3)
    done = subprocess.run([sys.executable, "-m", "grid", "console", "--config", cluster.write_client_config()],
                          capture_output=True, text=True, timeout=PEXPECT_WAIT, cwd=tmp_path,
                          env=console_environment(tmp_path), stdin=subprocess.DEVNULL)
    assert done.returncode == 3, done.stderr
    assert "allow_code = false" in done.stderr
    assert cluster.peers[0].alive, "the member refuses and keeps running"
