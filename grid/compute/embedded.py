"""A private local cluster: member processes of this machine, started and supervised here.

``GridExecutor()`` with no cluster configured uses one, like ``ProcessPoolExecutor``
uses its worker processes: loopback only, a random secret, ports chosen by the
OS, one task thread per member, a member that dies is restarted, and ``close()``
leaves nothing behind.

What a task prints reaches this process's own ``sys.stdout`` and ``sys.stderr``, line
by line as it runs, as a ``ProcessPoolExecutor`` worker's output does::

    member process                          this process: the "grid-embedded" thread
      stdout (line-buffered) --pipe-->        the ready line, then every line --> sys.stdout
      stderr (line-buffered) --pipe-->        every line --> sys.stderr, and the member's log
      logging --> --log-file member-N.log     (crash reports quote the log's last lines)

The same thread watches the members and restarts one that dies.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
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

_READY = b"grid peer ready "
_RESTART_LIMIT = 20  # restarts in _RESTART_WINDOW seconds before giving up
_RESTART_WINDOW = 30.0
_DRAIN_WAIT = 1.0  # seconds a crash report waits for a dead member's last output


class _Process:
    __slots__ = ("popen", "address", "log_path", "uuid", "returncode", "report", "mourned", "ready", "drained",
                 "partial", "open_pipes", "deadline", "stdout_fd")

    def __init__(self, popen, log_path, address, deadline):
        self.popen = popen
        self.log_path = log_path
        self.address = address
        self.uuid = None  # from its ready line
        self.returncode = None
        self.report = None  # how it ended, once it did
        self.mourned = False  # the supervisor saw it end (and restarted it, or gave up)
        self.ready = threading.Event()  # its ready line arrived
        self.drained = threading.Event()  # both of its pipes reached end of file
        self.partial = {}  # fd -> the bytes of a line not finished yet
        self.open_pipes = 2
        self.deadline = deadline  # monotonic time by which it must be ready
        self.stdout_fd = popen.stdout.fileno()  # (asked here: once its end is read, stdout is closed)


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
        self._supervising = False  # set once every first member is ready: from then on, the dead are restarted
        self._closed = False
        self._selector = selectors.DefaultSelector()
        self._wakeup_r, self._wakeup_w = os.pipe()  # a new member's pipes, or close(): the thread looks again
        os.set_blocking(self._wakeup_w, False)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ)
        self._monitor = threading.Thread(target=self._supervise, name="grid-embedded")
        self._monitor.start()
        try:
            ports = _free_ports(size)
            addresses = [("127.0.0.1", port) for port in ports]
            started = [self._spawn(address, addresses) for address in addresses]
            self._await_ready(started)
        except BaseException:
            self.close()
            raise
        self._supervising = True

    # -- public ----------------------------------------------------------------------------------

    def client_config(self) -> dict:
        """The config of a client of this cluster (for ``grid.connect``)."""
        with self._lock:
            members = [format_address(p.address) for p in self._processes
                       if p.ready.is_set() and p.returncode is None]
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
        """Stop every member (SIGTERM, then SIGKILL after a few seconds) and remove the temp folder.

        Their last output is forwarded before it returns."""
        with self._lock:
            self._supervising = False  # a member that ends now is not restarted
            self._closed = True  # nor is one started
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
            if process.popen.stdin is not None:
                process.popen.stdin.close()
        for process in processes:  # the thread forwards what they wrote last
            process.drained.wait(max(0.05, deadline - time.monotonic()))
        self._closing.set()
        self._wake()
        if self._monitor is not threading.current_thread():
            self._monitor.join()
        for process in processes:  # one whose task processes still hold its pipes open
            for pipe in (process.popen.stdout, process.popen.stderr):
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
        env["PYTHONIOENCODING"] = "utf-8"  # what the thread decodes
        with self._lock:  # started and listed at once: close() either stops it or it never starts
            if self._closed:
                raise GridError("the embedded cluster is closed")
            popen = subprocess.Popen(
                [sys.executable, "-m", "grid", "peer", "--procs", "1", "--stop-on-eof", "--config", path,
                 "--log-file", log_path],
                # stdin: our end closes when this process dies, however it dies; the member then leaves
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                cwd=self.directory, start_new_session=True)
            process = _Process(popen, log_path, tuple(address), time.monotonic() + self.startup_timeout)
            for pipe in (popen.stdout, popen.stderr):
                os.set_blocking(pipe.fileno(), False)
                process.partial[pipe.fileno()] = b""
            self._processes.append(process)
            for pipe in (popen.stdout, popen.stderr):
                self._selector.register(pipe.fileno(), selectors.EVENT_READ, process)
        self._wake()
        return process

    def _await_ready(self, processes) -> None:
        for process in processes:
            while not process.ready.wait(0.05):
                if process.popen.poll() is not None:
                    process.drained.wait(_DRAIN_WAIT)
                    raise GridError(f"an embedded member exited with code {process.popen.returncode} "
                                    f"before it was ready; its log ends with:\n{_tail(process.log_path)}")
                if time.monotonic() > process.deadline:
                    raise GridError(f"an embedded member did not start within {self.startup_timeout} s; "
                                    f"its log ends with:\n{_tail(process.log_path)}")

    def _wake(self) -> None:
        try:
            os.write(self._wakeup_w, b"x")
        except OSError:  # full (it will look anyway) or closed
            pass

    # -- the thread: output forwarded, members supervised ------------------------------------------------

    def _supervise(self) -> None:
        try:
            while not self._closing.is_set():
                for key, _ in self._selector.select(0.05):
                    if key.fd == self._wakeup_r:
                        os.read(self._wakeup_r, 4096)
                    else:
                        self._read(key.fd, key.data)
                self._mourn()
        finally:
            self._selector.close()
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)

    def _read(self, fd: int, process: _Process) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        is_stdout = fd == process.stdout_fd
        data = process.partial[fd] + chunk
        if chunk:
            *lines, process.partial[fd] = data.split(b"\n")
        else:  # end of file: what is left is a last line without its newline
            lines, process.partial[fd] = ([data] if data else []), b""
            self._selector.unregister(fd)
            (process.popen.stdout if is_stdout else process.popen.stderr).close()
            process.open_pipes -= 1
            if process.open_pipes == 0:
                process.drained.set()
        for line in lines:
            if is_stdout and not process.ready.is_set() and line.startswith(_READY):
                fields = line[len(_READY):].decode().split()
                process.uuid = fields[1].split("=", 1)[1]
                process.ready.set()
                continue
            self._forward(line, process, is_stdout)

    @staticmethod
    def _forward(line: bytes, process: _Process, is_stdout: bool) -> None:
        text = line.decode("utf-8", "replace") + "\n"
        if not is_stdout:  # the member's log gets it too: a crash's last words are in its report
            try:
                with open(process.log_path, "ab") as log_file:
                    log_file.write(line + b"\n")
            except OSError:
                pass
        stream = sys.stdout if is_stdout else sys.stderr
        if stream is None:  # pythonw, or closed at exit
            return
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # the caller closed it: the output has nowhere to go
            pass

    def _mourn(self) -> None:
        """Restart members that died (once all were up: before, ``_await_ready`` reports it)."""
        with self._lock:
            if not self._supervising:
                return
            # Not returncode: exit_report may have recorded a death before this loop saw it.
            dead = [p for p in self._processes if not p.mourned and p.popen.poll() is not None]
            for process in dead:
                process.mourned = True
            late = [p for p in self._processes if not p.ready.is_set() and p.popen.poll() is None
                    and time.monotonic() > p.deadline]
            for process in late:
                process.deadline = float("inf")  # said once
        for process in late:
            log.error("a restarted embedded member did not start within %s s; its log ends with:\n%s",
                      self.startup_timeout, _tail(process.log_path))
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
            self._spawn(address, live + [address])  # it joins on its own; this thread reads its ready line
        except OSError as exc:
            log.error("could not restart an embedded member: %s", exc)
        except GridError:  # closing meanwhile
            pass

    def _record_exit(self, process: _Process) -> str:
        if threading.current_thread() is not self._monitor:
            process.drained.wait(_DRAIN_WAIT)  # its last words on stderr reach the log first
        else:
            self._drain_now(process)
        with self._lock:
            if process.report is not None:
                return process.report
            process.returncode = code = process.popen.poll()
            how = (f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
                   else f"exited with code {code}")
            process.report = f"member process {process.popen.pid} {how}; its log ends with:\n{_tail(process.log_path)}"
            self._exits[process.address] = process.report  # the newest death at that address
            return process.report

    def _drain_now(self, process: _Process) -> None:
        """(On the thread) read what a dead member left in its pipes."""
        deadline = time.monotonic() + _DRAIN_WAIT
        while not process.drained.is_set():
            pipes = [pipe.fileno() for pipe in (process.popen.stdout, process.popen.stderr) if not pipe.closed]
            remaining = deadline - time.monotonic()
            if not pipes or remaining <= 0:
                return
            readable, _, _ = select.select(pipes, [], [], remaining)
            for fd in readable:
                self._read(fd, process)


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
