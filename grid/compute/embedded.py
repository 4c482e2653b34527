"""A private local cluster: member processes of this machine, started and supervised here.

``GridExecutor()`` with no cluster configured uses one, like ``ProcessPoolExecutor``
uses its worker processes: loopback only, a random secret, ports chosen by the
OS, one task thread per member, a member that dies is restarted, and ``close()``
leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from ..errors import GridError
from ..net.address import format_address
from ..net.folders import private_folder

log = logging.getLogger("grid.embedded")

_READY = "grid peer ready "
_RESTART_LIMIT = 20  # restarts in _RESTART_WINDOW seconds before giving up
_RESTART_WINDOW = 30.0


class _Process:
    __slots__ = ("popen", "address", "log_path", "uuid", "returncode", "report", "mourned")

    def __init__(self, popen, log_path):
        self.popen = popen
        self.log_path = log_path
        self.address = None
        self.uuid = None
        self.returncode = None
        self.report = None  # how it ended, once it did
        self.mourned = False  # the supervisor saw it end (and restarted it, or gave up)


class EmbeddedCluster:
    """``size`` member processes on 127.0.0.1 forming one private cluster.

    Raises:
        GridError: a member did not come up within ``startup_timeout`` (with its log).
    """

    def __init__(self, size: int, *, startup_timeout: float = 30.0, config: dict | None = None):
        if size < 1:
            raise ValueError(f"an embedded cluster needs at least one member, not {size}")
        self.size = size
        self.startup_timeout = startup_timeout
        self.directory = private_folder("grid-embedded-")
        self.secret = secrets.token_hex(16)
        self.cluster_id = "embedded-" + secrets.token_hex(4)
        self._extra = dict(config or {})
        self._lock = threading.Lock()
        self._processes: list[_Process] = []
        self._exits: dict[tuple, str] = {}  # address -> how that member process ended
        self._deaths: list[float] = []
        self._closing = threading.Event()
        self._counter = 0
        self._monitor = None
        try:
            ports = _free_ports(size)
            addresses = [("127.0.0.1", port) for port in ports]
            started = [self._spawn(address, addresses) for address in addresses]
            self._await_ready(started)
        except BaseException:
            self.close()
            raise
        self._monitor = threading.Thread(target=self._supervise, name="grid-embedded")
        self._monitor.start()

    # -- public ----------------------------------------------------------------------------------

    def client_config(self) -> dict:
        """The config of a client of this cluster (for ``grid.connect``)."""
        with self._lock:
            members = [format_address(p.address) for p in self._processes if p.address and p.returncode is None]
        return {"id": self.cluster_id, "secret": self.secret, "join": "tcp", "members": members,
                "interface": "127.0.0.1", "port": 0}

    def exit_report(self, address, timeout: float = 2.0, uuid: str | None = None) -> str | None:
        """How the member process at ``address`` (the one named ``uuid``, if given: a restarted
        member reuses its predecessor's address) ended: exit code or signal, last log lines.
        None if it is still running after ``timeout`` seconds."""
        address = tuple(address)
        with self._lock:
            process = next((p for p in reversed(self._processes)
                            if p.address == address and (uuid is None or p.uuid == uuid)), None)
            if process is None:
                return self._exits.get(address) if uuid is None else None
        if process.returncode is None:
            try:
                process.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        return self._record_exit(process)

    def pids(self) -> list[int]:
        with self._lock:
            return [p.popen.pid for p in self._processes if p.returncode is None]

    def close(self) -> None:
        """Stop every member (SIGTERM, then SIGKILL after a few seconds) and remove the temp folder."""
        self._closing.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join()
        with self._lock:
            processes = list(self._processes)
        for process in processes:
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for process in processes:
            try:
                process.popen.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
            for pipe in (process.popen.stdout, process.popen.stdin):
                if pipe is not None:
                    pipe.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- starting members --------------------------------------------------------------------------

    def _spawn(self, address, addresses) -> _Process:
        self._counter += 1
        config = {"id": self.cluster_id, "secret": self.secret, "join": "tcp", "interface": "127.0.0.1",
                  "port": address[1], "members": [format_address(a) for a in addresses], "workers": 1,
                  "join_timeout": 0.5, "heartbeat_interval": 0.5, "failure_timeout": 5.0}
        config.update(self._extra)
        path = os.path.join(self.directory, f"member-{self._counter}.json")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
            json.dump(config, file)
        log_path = os.path.join(self.directory, f"member-{self._counter}.log")
        env = dict(os.environ)
        env.pop("GRID", None)
        env.pop("GRID_SECRET", None)
        # Like ProcessPoolExecutor's workers, members import what this process can import
        # (the script's folder, the test rootdir, ...), though they run in the temp folder.
        env["PYTHONPATH"] = os.pathsep.join(_import_path())
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(
                [sys.executable, "-m", "grid", "peer", "--procs", "1", "--stop-on-eof", "--config", path],
                # stdin: our end closes when this process dies, however it dies; the member then leaves
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env=env,
                cwd=self.directory, start_new_session=True)
        process = _Process(popen, log_path)
        with self._lock:
            self._processes.append(process)
        return process

    def _await_ready(self, processes) -> None:
        deadline = time.monotonic() + self.startup_timeout
        waiting = {p.popen.stdout.fileno(): p for p in processes}
        buffers = {fd: b"" for fd in waiting}
        with selectors.DefaultSelector() as selector:
            for fd in waiting:
                selector.register(fd, selectors.EVENT_READ)
            while waiting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    stuck = next(iter(waiting.values()))
                    raise GridError(f"an embedded member did not start within {self.startup_timeout} s; "
                                    f"its log ends with:\n{_tail(stuck.log_path)}")
                for key, _ in selector.select(remaining):
                    fd = key.fd
                    chunk = os.read(fd, 4096)
                    process = waiting[fd]
                    if not chunk:
                        process.popen.wait()
                        raise GridError(f"an embedded member exited with code {process.popen.returncode} "
                                        f"before it was ready; its log ends with:\n{_tail(process.log_path)}")
                    buffers[fd] += chunk
                    if b"\n" in buffers[fd]:
                        line = buffers[fd].split(b"\n", 1)[0].decode()
                        if line.startswith(_READY):
                            fields = line[len(_READY):].split()
                            host, port = fields[0].rsplit(":", 1)
                            process.address = (host, int(port))
                            process.uuid = fields[1].split("=", 1)[1]
                        selector.unregister(fd)
                        del waiting[fd]

    # -- supervising ----------------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._closing.wait(0.05):
            with self._lock:
                # Not returncode: exit_report may have recorded a death before this loop saw it.
                dead = [p for p in self._processes if not p.mourned and p.popen.poll() is not None]
                for process in dead:
                    process.mourned = True
            for process in dead:
                report = self._record_exit(process)
                log.warning("embedded member %s died: %s", format_address(process.address), report.splitlines()[0])
                now = time.monotonic()
                self._deaths = [t for t in self._deaths if now - t < _RESTART_WINDOW] + [now]
                if len(self._deaths) > _RESTART_LIMIT:
                    log.error("embedded members keep dying (%d times in %.0f s); not restarting them",
                              len(self._deaths), _RESTART_WINDOW)
                    continue
                self._restart(process.address)

    def _restart(self, old_address) -> None:
        """Start a member in place of the one at ``old_address``, on the same port when it is free:
        clients know the first members' addresses, so even with every member dead they find it."""
        with self._lock:
            live = [p.address for p in self._processes if p.returncode is None and p.address]
        address = tuple(old_address) if old_address else ("127.0.0.1", _free_ports(1)[0])
        try:
            process = self._spawn(address, live + [address])
            self._await_ready([process])
        except GridError as exc:
            log.error("could not restart an embedded member: %s", exc)

    def _record_exit(self, process: _Process) -> str:
        with self._lock:
            if process.report is not None:
                return process.report
            process.returncode = code = process.popen.poll()
            how = (f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
                   else f"exited with code {code}")
            process.report = f"member process {process.popen.pid} {how}; its log ends with:\n{_tail(process.log_path)}"
            self._exits[process.address] = process.report  # the newest death at that address
            return process.report


def _import_path() -> list[str]:
    """This process's ``sys.path`` as absolute folders ('' is the current folder), in order."""
    folders = []
    for entry in sys.path:
        if isinstance(entry, str):
            folder = os.path.abspath(entry or os.curdir)
            if folder not in folders:
                folders.append(folder)
    return folders


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _tail(path: str, lines: int = 10) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 8192))
            text = file.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"
