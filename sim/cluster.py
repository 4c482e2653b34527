"""LocalCluster: N grid member processes on loopback, started, watched and broken on purpose.

    LocalCluster ── Popen ──> peer I: <command> --config peer-I.json --procs 1
        ^                        │ stdout ──> reader thread "sim-...-peer-I-stdout"
        │ Condition: ready/EOF   │              │  finds "grid peer ready ADDR uuid=U pid=P ..."
        └────────────────────────┼──────────────┘  then keeps copying stdout into the log
                                 │ stderr ──────────────────────────────> peer-I.log (append)

Everything lives in one temp directory (config files, members file, registry
folder, logs), removed by ``terminate()``. Each peer runs in its own process
group (session), so a signal reaches a supervisor and its member alike, and a
Ctrl-C in the terminal reaches the simulator, which then stops the peers cleanly.

``PeerProcess``, ``SimError``, ``wait_until`` and the process and port helpers
live in ``process.py``.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .faults import FaultControl, faults_by_peer, partition_pairs
from .process import (
    LOG_TAIL_LINES,
    LOOPBACK,
    STATE_CHANGE_TIMEOUT,
    PeerProcess,
    SimError,
    await_stopped_state,
    default_peer_command,
    describe_exit,
    format_address,
    free_udp_port,
    parse_address,
    peer_environment,
    reserve_tcp_ports,
    signal_group,
    stop_peers,
    wait_until,
)

JOIN_METHODS = ("tcp", "file", "registry", "multicast")
MULTICAST_GROUP = "224.2.2.3"
DEFAULT_MULTICAST_TIMEOUT = 1.0
READY_PATTERN = re.compile(r"grid peer ready (\S+) uuid=(\S+) pid=(\d+)(?: cluster=(\S+))?")
# Signals after which kill() waits for the peer to be reaped, unless told otherwise.
FATAL_SIGNALS = frozenset(
    {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGABRT}
)
# Clusters not yet terminated; the atexit safety net terminates them.
_LIVE_CLUSTERS: set[LocalCluster] = set()


class LocalCluster:
    """N grid member processes on loopback with a fresh cluster id, secret and temp dir.

    Usage::

        with LocalCluster(3, heartbeat_interval=0.2, failure_timeout=1.0) as cluster:
            cluster.kill(0)
            cluster.wait_until(lambda: len(cluster.connect().members()) == 2)
    """

    def __init__(
        self,
        n: int = 3,
        join: str = "tcp",
        *,
        command: Sequence[str] | None = None,
        startup_timeout: float = 30.0,
        seed: int | None = None,
        **config: Any,
    ):
        """Start ``n`` peers at once and wait until every one printed its ready line.

        Args:
            n: how many peers to start (0 is allowed; ``add()`` more later).
            join: "tcp" (a members list of OS-reserved ports), "file" (a members file),
                "registry" (a registry folder) or "multicast" (a free group port on loopback).
            command: the peer command before ``--config FILE --procs 1``; default
                ``$SIM_PEER_COMMAND`` (split like a shell) or ``python -m grid peer``.
            startup_timeout: seconds to wait for ready lines (for ``add()`` too).
            seed: seeds ``self.random``, which makes the cluster id and secret
                reproducible; without it the secret comes from ``secrets``.
            **config: grid config keys that override or extend every peer's config;
                dict values (e.g. ``multicast={"timeout_seconds": 0.5}``) are merged.

        Raises:
            ValueError: unknown join method, negative n, or a non-loopback interface.
            SimError: a peer exited or missed the deadline before it was ready; every
                peer started is terminated first and the temp dir removed.
        """
        if join not in JOIN_METHODS:
            raise ValueError(
                f"unknown join method {join!r}: the simulator knows {', '.join(JOIN_METHODS)}"
            )
        if n < 0:
            raise ValueError(f"n must be 0 or more peers, not {n}")
        _check_loopback(config)
        self.join = join
        self.startup_timeout = startup_timeout
        self.seed = seed
        self.random = random.Random(seed)
        self.cluster_id = f"sim-{self.random.getrandbits(32):08x}"
        self.secret = f"{self.random.getrandbits(128):032x}" if seed is not None else secrets.token_hex(16)
        self.command = list(command) if command is not None else default_peer_command()
        self.peers: list[PeerProcess] = []
        self._overrides = config
        self._condition = threading.Condition()
        self._stopping = threading.Event()
        self._terminate_lock = threading.Lock()
        self._blocked: set[tuple[int, int]] = set()  # (source, target): source cannot reach target
        self._faults = FaultControl(cluster_id=self.cluster_id, secret=self.secret,
                                    timeout=STATE_CHANGE_TIMEOUT)
        self._terminated = False
        self.multicast_port = free_udp_port() if join == "multicast" else None
        self.directory = tempfile.mkdtemp(prefix=f"{self.cluster_id}-")
        self.members_file = os.path.join(self.directory, "members.txt") if join == "file" else None
        self.registry_dir = os.path.join(self.directory, "registry") if join == "registry" else None
        _LIVE_CLUSTERS.add(self)
        try:
            if self.registry_dir is not None:
                os.mkdir(self.registry_dir)
            self._start_initial(n)
        except BaseException:
            self.terminate()
            raise

    # ---------------------------------------------------------------- starting

    def _start_initial(self, count: int) -> None:
        if self.join in ("tcp", "file"):
            ports = reserve_tcp_ports(count)
            addresses = [format_address((LOOPBACK, port)) for port in ports]
            if self.members_file is not None:
                _write_lines(self.members_file, addresses, mode="w")
                members: Any = {"path": self.members_file}
            else:
                members = addresses
            configs = [self._peer_config(port, members, {}) for port in ports]
        else:
            configs = [self._peer_config(0, self._shared_members(), {}) for _ in range(count)]
        started = [self._launch(peer_config) for peer_config in configs]
        self._await_ready(started)

    def _shared_members(self) -> Any:
        if self.registry_dir is not None:
            return {"path": self.registry_dir + os.sep}
        return None

    def _peer_config(self, port: int, members: Any, overrides: dict) -> dict:
        config: dict[str, Any] = {
            "id": self.cluster_id,
            "secret": self.secret,
            "join": "multicast" if self.join == "multicast" else "tcp",
            "interface": LOOPBACK,
            "port": port,
        }
        if members is not None:
            config["members"] = members
        if self.join == "multicast":
            config["multicast"] = {
                "group": MULTICAST_GROUP,
                "port": self.multicast_port,
                "timeout_seconds": DEFAULT_MULTICAST_TIMEOUT,
            }
        return merged_settings(merged_settings(config, self._overrides), overrides)

    def _launch(self, config: dict) -> PeerProcess:
        index = len(self.peers)
        config_path = os.path.join(self.directory, f"peer-{index}.json")
        log_path = os.path.join(self.directory, f"peer-{index}.log")
        with open(config_path, "w", encoding="utf-8") as config_file:
            json.dump(config, config_file, indent=2)
        argv = [*self.command, "--config", config_path, "--procs", "1"]
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                cwd=self.directory,
                env=peer_environment(),
                start_new_session=True,
            )
        peer = PeerProcess(index, popen, config, config_path, log_path)
        self.peers.append(peer)
        # Daemon only so that a forgotten cluster cannot block interpreter exit before
        # the atexit safety net runs; terminate() joins every reader.
        peer._reader = threading.Thread(
            target=self._pump_stdout,
            args=(peer,),
            name=f"sim-{self.cluster_id}-peer-{index}-stdout",
            daemon=True,
        )
        peer._reader.start()
        return peer

    def _pump_stdout(self, peer: PeerProcess) -> None:
        stream = peer.popen.stdout
        assert stream is not None
        try:
            with open(peer.log_path, "ab", buffering=0) as log:
                for raw_line in iter(stream.readline, b""):
                    log.write(raw_line)
                    if peer.address is None:
                        self._note_ready_line(peer, raw_line.decode("utf-8", "replace"))
        finally:
            stream.close()
            with self._condition:
                peer._stdout_closed = True
                self._condition.notify_all()

    def _note_ready_line(self, peer: PeerProcess, line: str) -> None:
        match = READY_PATTERN.search(line)
        if match is None:
            return
        try:
            address = parse_address(match.group(1))
        except ValueError:
            return  # not a ready line we understand; the deadline will report the log
        with self._condition:
            peer.uuid = match.group(2)
            peer.pid = int(match.group(3))
            peer.cluster_id = match.group(4)
            peer.ready_line = line.strip()
            peer.address = address
            self._condition.notify_all()

    def _await_ready(self, peers: list[PeerProcess]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with self._condition:
            while True:
                exited = [peer for peer in peers if peer._stdout_closed and not peer.ready]
                if exited or all(peer.ready for peer in peers):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
        if exited:
            peer = exited[0]
            try:
                exit_code: int | None = peer.popen.wait(STATE_CHANGE_TIMEOUT)
                what = f"exited {describe_exit(exit_code)}"
            except subprocess.TimeoutExpired:
                exit_code = None
                what = "closed its stdout but keeps running"
            raise self._peer_error(
                peer, f"peer {peer.index} {what} before it printed its ready line", exit_code
            )
        late = [peer for peer in peers if not peer.ready]
        if late:
            peer = late[0]
            exit_code = peer.popen.poll()
            raise self._peer_error(
                peer,
                f"peer {peer.index} did not print its ready line within {self.startup_timeout:g} s"
                f" ({len(late)} of {len(peers)} peers not ready); raise startup_timeout if the"
                " machine is slow",
                exit_code,
            )

    def _peer_error(self, peer: PeerProcess, what: str, exit_code: int | None) -> SimError:
        return SimError(
            f"{what}; command: {shlex.join(peer.popen.args)}",
            index=peer.index,
            exit_code=exit_code,
            log_path=peer.log_path,
            log_tail=self._log_tail(peer),
        )

    def _log_tail(self, peer: PeerProcess) -> str:
        try:
            text = self._read_log(peer)
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])

    @staticmethod
    def _read_log(peer: PeerProcess) -> str:
        with open(peer.log_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    # ---------------------------------------------------------------- public API

    def addresses(self) -> list[tuple[str, int]]:
        """The ``(host, port)`` addresses of the peers that are ready and alive (paused count).

        Returns:
            A list in peer index order.
        """
        return [peer.address for peer in self.peers if peer.address is not None and peer.alive]

    def add(self, **config_overrides: Any) -> PeerProcess:
        """Start one more peer and wait for its ready line.

        With "tcp" its members are the live peers plus itself; with "file" its address
        is appended to the members file first.

        Args:
            **config_overrides: config keys for this peer only (merged over the cluster's).

        Returns:
            The new, ready ``PeerProcess``.

        Raises:
            SimError: the peer exited or missed ``startup_timeout``; it is stopped, stays
                in ``peers`` as exited, and the rest of the cluster keeps running.
            ValueError: a non-loopback interface.
        """
        self._check_open()
        _check_loopback(config_overrides)
        if self.join in ("tcp", "file"):
            port = reserve_tcp_ports(1)[0]
            own = format_address((LOOPBACK, port))
            if self.members_file is not None:
                _write_lines(self.members_file, [own], mode="a")
                members: Any = {"path": self.members_file}
            else:
                members = [format_address(address) for address in self.addresses()] + [own]
        else:
            port, members = 0, self._shared_members()
        peer = self._launch(self._peer_config(port, members, config_overrides))
        try:
            self._await_ready([peer])
        except BaseException:
            stop_peers([peer], timeout=STATE_CHANGE_TIMEOUT)
            raise
        return peer

    def kill(
        self, i: int, sig: int = signal.SIGKILL, *, wait: bool | None = None, timeout: float = 10.0
    ) -> int | None:
        """Send ``sig`` to peer ``i`` (its whole process group).

        Args:
            i: the peer's index.
            sig: the signal; default SIGKILL.
            wait: wait until the peer is reaped; default: when ``sig`` is fatal
                (KILL, TERM, INT, QUIT, ABRT). A paused peer is resumed so it can act on it.
            timeout: seconds to wait.

        Returns:
            The exit code when waited for, else None.

        Raises:
            SimError: the peer had already exited, or is still running after ``timeout``.
            IndexError: no peer ``i``.
        """
        peer = self._running_peer(i)
        signal_group(peer, sig)
        if wait is None:
            wait = sig in FATAL_SIGNALS
        if not wait:
            return None
        if peer.paused and sig != signal.SIGKILL:
            signal_group(peer, signal.SIGCONT)
        try:
            exit_code = peer.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._peer_error(
                peer,
                f"peer {i} still runs {timeout:g} s after {signal.Signals(sig).name}",
                None,
            ) from None
        peer.paused = False
        return exit_code

    def pause(self, i: int) -> None:
        """Freeze peer ``i`` with SIGSTOP and return once it is stopped.

        Raises:
            SimError: the peer had already exited.
        """
        peer = self._running_peer(i)
        signal_group(peer, signal.SIGSTOP)
        peer.paused = True
        await_stopped_state(peer, stopped=True)

    def resume(self, i: int) -> None:
        """Continue peer ``i`` with SIGCONT and return once it runs again.

        Raises:
            SimError: the peer had already exited.
        """
        peer = self._running_peer(i)
        signal_group(peer, signal.SIGCONT)
        peer.paused = False
        await_stopped_state(peer, stopped=False)

    def stop(self, i: int, timeout: float = 10.0) -> int:
        """Ask peer ``i`` to leave cleanly (SIGTERM) and wait until it exited.

        Returns:
            Its exit code (0 for a clean leave).

        Raises:
            SimError: it had already exited, or did not exit within ``timeout``, in which
                case it was killed with SIGKILL.
        """
        try:
            exit_code = self.kill(i, signal.SIGTERM, wait=True, timeout=timeout)
        except SimError as error:
            if error.exit_code is None and self.peers[i].popen.poll() is None:
                signal_group(self.peers[i], signal.SIGKILL)
                self.peers[i].popen.wait()
                raise SimError(
                    f"peer {i} did not leave within {timeout:g} s of SIGTERM, so it was killed",
                    index=i,
                    exit_code=self.peers[i].popen.returncode,
                    log_path=error.log_path,
                    log_tail=error.log_tail,
                ) from None
            raise
        assert exit_code is not None
        return exit_code

    def wait_until(
        self,
        predicate: Callable[[], Any],
        timeout: float = 10.0,
        interval: float = 0.02,
        message: str | None = None,
    ) -> Any:
        """Poll ``predicate`` until it is truthy; see ``sim.wait_until``.

        Returns:
            The predicate's first truthy value.

        Raises:
            TimeoutError: not truthy within ``timeout`` seconds.
        """
        return wait_until(predicate, timeout, interval, message, _stop=self._stopping)

    def log(self, i: int) -> str:
        """Everything peer ``i`` wrote so far (stderr and stdout).

        Raises:
            IndexError: no peer ``i``.
            FileNotFoundError: the cluster was terminated and its temp dir removed.
        """
        return self._read_log(self.peers[i])

    def config(self, i: int | None = None) -> dict:
        """A client config dict for ``grid.connect``.

        Args:
            i: connect through peer ``i`` only; default: every live peer is a candidate.

        Returns:
            ``{"id", "secret", "join": "tcp", "members", "interface"}``, plus the cluster's
            timing overrides (``heartbeat_interval``, ``failure_timeout``, ``handshake_timeout``,
            ``join_timeout``), so a client notices a frozen member as fast as the members do.

        Raises:
            SimError: peer ``i`` is not ready or has exited.
        """
        if i is None:
            addresses = self.addresses()
        else:
            peer = self._running_peer(i)
            if peer.address is None:
                raise SimError(f"peer {i} is not ready yet, so it has no address to connect to")
            addresses = [peer.address]
        return {
            "id": self.cluster_id,
            "secret": self.secret,
            "join": "tcp",
            "members": [format_address(address) for address in addresses],
            "interface": LOOPBACK,
            **{key: value for key, value in self._overrides.items() if key in _CLIENT_TIMINGS},
        }

    def write_client_config(self, i: int | None = None) -> str:
        """Write ``config(i)`` as JSON into the temp dir (owner-only) and return its path.

        The file is usable as ``GRID=<path>``; it disappears with ``terminate()``.
        """
        self._check_open()
        path = os.path.join(self.directory, "client.json" if i is None else f"client-{i}.json")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(descriptor, "w", encoding="utf-8") as client_file:
            json.dump(self.config(i), client_file, indent=2)
        return path

    def connect(self):
        """Connect a client to this cluster: ``grid.connect(self.config())``.

        Returns:
            grid's ``Cluster`` handle; close it (or use it as a context manager).
        """
        import grid  # lazily: the simulator itself does not need grid

        return grid.connect(self.config())

    # ---------------------------------------------------------------- network splits

    def partition(self, *groups: Sequence[int]) -> None:
        """Split the live peers into ``groups`` (lists of indexes) that cannot reach each other.

        Inside each peer's transport: dials across the split fail and frames on links across
        it are dropped, so each side meets silence and goes on as a cluster of its own.
        ``partition([0, 1], [2])`` is a {2, 1} split. It replaces any split before it.

        Raises:
            SimError: a live peer is in no group, or in two.
        """
        self._blocked = partition_pairs(groups, [p.index for p in self.peers if p.alive])
        self._apply_faults()

    def block(self, sources: Sequence[int], targets: Sequence[int]) -> None:
        """One way: the peers ``sources`` cannot reach ``targets`` (links dialed the other way still work)."""
        self._blocked |= {(s, t) for s in sources for t in targets if s != t}
        self._apply_faults()

    def heal(self) -> None:
        """End every split: all peers reach each other again."""
        self._blocked = set()
        self._apply_faults()

    def _apply_faults(self) -> None:
        self._check_open()
        live = {p.index: p.address for p in self.peers if p.alive and p.address is not None}
        for index, body in faults_by_peer(self._blocked, live).items():
            self._faults.apply(live[index], body)

    def terminate(self, timeout: float = 5.0) -> None:
        """Stop every peer and remove the temp dir; safe to call more than once.

        Paused peers are resumed, all get SIGTERM, those still running after
        ``timeout`` seconds get SIGKILL; all are reaped and the reader threads joined.
        """
        with self._terminate_lock:
            if self._terminated:
                return
            self._terminated = True
        self._stopping.set()
        try:
            self._faults.close()
            stop_peers(self.peers, timeout)
        finally:
            _LIVE_CLUSTERS.discard(self)
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()

    def __repr__(self) -> str:
        state = "terminated" if self._terminated else f"{len(self.addresses())} live"
        return f"<LocalCluster {self.cluster_id} join={self.join} {len(self.peers)} peers, {state}>"

    # ---------------------------------------------------------------- internals

    def _running_peer(self, i: int) -> PeerProcess:
        self._check_open()
        peer = self.peers[i]
        exit_code = peer.popen.poll()
        if exit_code is not None:
            raise SimError(
                f"peer {i} already exited {describe_exit(exit_code)}; "
                "start another with add()",
                index=i,
                exit_code=exit_code,
            )
        return peer

    def _check_open(self) -> None:
        if self._terminated:
            raise SimError(f"cluster {self.cluster_id} is terminated; start a new LocalCluster")


_CLIENT_TIMINGS = ("heartbeat_interval", "failure_timeout", "handshake_timeout", "join_timeout")


def _write_lines(path: str, lines: list[str], *, mode: str) -> None:
    with open(path, mode, encoding="utf-8") as members_file:
        members_file.writelines(line + "\n" for line in lines)


def merged_settings(base: dict, overrides: dict) -> dict:
    """``base`` updated by ``overrides``, merging dicts found on both sides."""
    result = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged_settings(result[key], value)
        else:
            result[key] = value
    return result


def _check_loopback(config: dict) -> None:
    interface = config.get("interface", LOOPBACK)
    try:
        loopback = ipaddress.ip_address(interface).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"interface {interface!r} is not a loopback address: the simulator runs "
            f"its peers on loopback only; leave interface unset ({LOOPBACK})"
        )


@atexit.register
def _terminate_forgotten_clusters() -> None:
    for cluster in list(_LIVE_CLUSTERS):
        cluster.terminate()
