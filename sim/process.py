"""One simulated peer process: its handle, and how it is started, signalled, watched and stopped.

``PeerProcess`` is what ``LocalCluster.peers`` holds and ``SimError`` what a failing
peer raises. The helpers deal with processes and the OS only: the peer command
and environment, signals to a peer's process group, its state from /proc,
stopping and reaping a list of peers, free loopback ports; ``wait_until`` polls a
condition with a deadline. ``cluster.py`` composes them into a ``LocalCluster``.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

LOOPBACK = "127.0.0.1"
LOG_TAIL_LINES = 20
PEER_COMMAND_ENV = "SIM_PEER_COMMAND"
STATE_CHANGE_TIMEOUT = 5.0


class SimError(RuntimeError):
    """A simulated peer failed: it exited or hung before it was ready, or would not stop.

    Attributes:
        index: the peer's index in ``LocalCluster.peers`` (None if not about one peer).
        exit_code: the peer's exit code (negative: killed by that signal), None if running.
        log_path: the peer's log file (removed with the cluster's temp dir by terminate()).
        log_tail: the last lines of that log, also included in the message.
    """

    def __init__(
        self,
        message: str,
        *,
        index: int | None = None,
        exit_code: int | None = None,
        log_path: str | None = None,
        log_tail: str = "",
    ):
        self.index = index
        self.exit_code = exit_code
        self.log_path = log_path
        self.log_tail = log_tail
        if log_path is not None:
            tail = log_tail if log_tail else "(empty)"
            message = f"{message}\n--- last {LOG_TAIL_LINES} lines of {log_path} ---\n{tail}"
        super().__init__(message)


class PeerProcess:
    """One member process started by a LocalCluster.

    Attributes:
        index: position in ``LocalCluster.peers``; never reused.
        address: ``(host, port)`` from the ready line; None until the peer is ready.
        uuid: the member's uuid from the ready line; None until ready.
        pid: the member's pid from the ready line (``popen.pid`` until ready).
        cluster_id: the cluster id the ready line names, if it names one.
        popen: the ``subprocess.Popen`` the simulator owns (leader of its process group).
        config: the config dict written to ``config_path``.
        log_path: stderr and stdout of the peer, appended as they come.
        paused: True between ``pause()`` and ``resume()``.
    """

    def __init__(self, index: int, popen: subprocess.Popen, config: dict, config_path: str, log_path: str):
        self.index = index
        self.popen = popen
        self.config = config
        self.config_path = config_path
        self.log_path = log_path
        self.address: tuple[str, int] | None = None
        self.uuid: str | None = None
        self.pid: int = popen.pid
        self.cluster_id: str | None = None
        self.ready_line: str | None = None
        self.paused = False
        self._stdout_closed = False
        self._reader: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        """True while the process has not exited (a paused peer is alive)."""
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code once exited (negative: killed by that signal), else None."""
        return self.popen.poll()

    @property
    def ready(self) -> bool:
        """True once the peer printed its ready line."""
        return self.address is not None

    @property
    def address_text(self) -> str | None:
        """The address as ``"host:port"``, or None until ready."""
        return None if self.address is None else format_address(self.address)

    def __repr__(self) -> str:
        if self.popen.returncode is not None:
            state = f"exited {describe_exit(self.popen.returncode)}"
        elif self.paused:
            state = "paused"
        elif self.ready:
            state = "ready"
        else:
            state = "starting"
        return f"<PeerProcess {self.index} {self.address_text or '-'} pid={self.pid} {state}>"


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str | None = None,
    *,
    _stop: threading.Event | None = None,
) -> Any:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy.

    Args:
        predicate: a callable without arguments; exceptions it raises propagate.
        timeout: seconds before giving up.
        interval: seconds between calls.
        message: what is being waited for, used in the error.

    Returns:
        The predicate's first truthy value.

    Raises:
        TimeoutError: the predicate stayed falsy for ``timeout`` seconds; the message
            names what was awaited and the last value seen.
    """
    pause = _stop if _stop is not None else threading.Event()
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = message or f"condition {getattr(predicate, '__qualname__', repr(predicate))}"
            raise TimeoutError(
                f"{what}: still not true after {timeout:g} s (last value {value!r}); "
                "check the peers' logs, or allow a longer timeout"
            )
        pause.wait(min(interval, remaining))


def default_peer_command() -> list[str]:
    """The peer command: ``$SIM_PEER_COMMAND`` split like a shell, else ``python -m grid peer``."""
    override = os.environ.get(PEER_COMMAND_ENV)
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "grid", "peer"]


def peer_environment() -> dict[str, str]:
    environment = dict(os.environ)
    # The peer's config file names the cluster and secret; a stray GRID or GRID_SECRET
    # from the user's shell must not change them.
    environment.pop("GRID", None)
    environment.pop("GRID_SECRET", None)
    environment.pop(PEER_COMMAND_ENV, None)
    environment["PYTHONUNBUFFERED"] = "1"
    environment["GRID_SIM_FAULTS"] = "1"  # the peer takes partition()/heal() orders (sim/faults.py)
    # Run from a source checkout: make `python -m grid` find the grid next to sim.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(root, "grid")):
        existing = environment.get("PYTHONPATH")
        environment["PYTHONPATH"] = root + (os.pathsep + existing if existing else "")
    return environment


def signal_group(peer: PeerProcess, sig: int) -> None:
    # Only while the leader is unreaped: its pid (= the group id) cannot be reused yet.
    if peer.popen.returncode is not None:
        return
    try:
        os.killpg(peer.popen.pid, sig)
    except ProcessLookupError:
        pass


def process_state(pid: int) -> str | None:
    """The state letter from /proc (R, S, T, Z, ...), or None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def stop_peers(peers: list[PeerProcess], timeout: float) -> None:
    """SIGTERM the running peers (paused ones resumed), SIGKILL any left after ``timeout``, reap all."""
    running = [peer for peer in peers if peer.popen.returncode is None]
    for peer in running:
        signal_group(peer, signal.SIGTERM)
        if peer.paused:
            signal_group(peer, signal.SIGCONT)
    deadline = time.monotonic() + timeout
    stragglers = []
    for peer in running:
        try:
            peer.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stragglers.append(peer)
    for peer in stragglers:
        signal_group(peer, signal.SIGKILL)
    for peer in running:
        peer.popen.wait()
        peer.paused = False
    for peer in peers:
        if peer._reader is not None:
            # EOF comes once the group is dead; a detached grandchild holding the
            # pipe is the only way past this timeout.
            peer._reader.join(timeout)


def await_stopped_state(peer: PeerProcess, *, stopped: bool) -> None:
    """Return once /proc shows the peer stopped (SIGSTOP) or running again; at once without /proc."""
    def in_state() -> bool:
        state = process_state(peer.popen.pid)
        return state is None or (state in "Tt") == stopped

    wait_until(
        in_state,
        STATE_CHANGE_TIMEOUT,
        0.001,
        f"peer {peer.index} to be {'stopped' if stopped else 'running'}",
    )


def reserve_tcp_ports(count: int) -> list[int]:
    """Ask the OS for ``count`` distinct free TCP ports on loopback (bound together, then freed)."""
    sockets = []
    try:
        for _ in range(count):
            reservation = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(reservation)
            reservation.bind((LOOPBACK, 0))
        return [reservation.getsockname()[1] for reservation in sockets]
    finally:
        for reservation in sockets:
            reservation.close()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as reservation:
        reservation.bind((LOOPBACK, 0))
        return reservation.getsockname()[1]


def parse_address(text: str) -> tuple[str, int]:
    host, separator, port = text.rpartition(":")
    if not separator or not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {text!r}")
    return host.strip("[]"), int(port)


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_exit(exit_code: int) -> str:
    if exit_code < 0:
        try:
            return f"killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"killed by signal {-exit_code}"
    return f"with code {exit_code}"

