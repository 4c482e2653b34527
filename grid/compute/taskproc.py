"""Task processes: with ``task_processes = N`` a member runs its tasks in N child processes.

::

    member task thread "grid-task-i"                child process i (python -m grid.compute.taskproc)
      ("fn", serial, pickled)   new function  ---->   unpickled once, kept by serial (bounded)
      ("init", pickled)         a link's initializer  run before that link's first task here
      ("run", serial, task)     ----------------->    run_task(fn, task)
                                <-----------------    (task id, status, value, seconds)
      EOF (the child died): the task fails with WorkerCrashed naming the exit code or
      signal; the child is started again and the member goes on

A task that kills its process (``os._exit``, a segfault in an extension) takes down that
child, not the member: heartbeats, the other tasks and the member's links carry on. The
cost is a pickle round trip over a pipe per task, and the child's own interpreter: it
imports what the task needs by reference (``sys.path`` as the member's) and the modules
of ``imports``; code shipped with ``exec_all``/``load_all``/``deploy`` after the child
started is not in it (such functions travel by value, or use ``task_processes = 0``).

Messages are length-prefixed pickles on the child's stdin and a private copy of its
stdout; the child's own ``sys.stdout`` goes to the member's stderr, so a task's prints
cannot corrupt them. The child ends when its stdin closes (the member closed or died).
"""

from __future__ import annotations

import collections
import importlib
import logging
import os
import signal
import struct
import subprocess
import sys
import threading

from ..cluster.members import Member
from ..errors import WorkerCrashed
from ..net import serialize
from . import worker
from .protocol import CALL, FAILED, NO_VALUES

log = logging.getLogger("grid.worker")

_HEADER = struct.Struct("!I")
_KEPT_FUNCTIONS = 1024  # functions a child keeps (the newest); older ones are sent again if needed


class _Died(Exception):
    """The child process ended while it ran something (it was started again); ``report`` says how."""

    def __init__(self, report: str):
        super().__init__(report)
        self.report = report


class TaskProcess:
    """One child process that runs the tasks of one member task thread; restarted when it dies.

    Only its task thread calls it (no lock).
    """

    def __init__(self, member_info: dict | None, imports=()):
        self._member_info = member_info
        self._imports = list(imports)
        self.restarts = 0
        self._popen = None
        self._spawn()

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if isinstance(p, str) and p)
        self._popen = subprocess.Popen(
            [sys.executable, "-m", "grid.compute.taskproc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, bufsize=0)
        self._functions: collections.OrderedDict = collections.OrderedDict()  # serials the child holds
        self._inits: set[int] = set()  # serials of the link states whose initializer ran in this child
        self._send(("hello", self._member_info, self._imports))

    @property
    def pid(self) -> int:
        return self._popen.pid

    def initialized(self, key: int) -> bool:
        """Whether this child ran the initializer of the link named ``key``."""
        return key in self._inits

    def initialize(self, key: int, pickled):
        """Run a link's pickled initializer in the child: None, or the packed error it failed with
        (a WorkerCrashed if it killed the child, which is started again)."""
        self._inits.add(key)
        try:
            return self._call(("init", pickled))
        except _Died as died:
            return serialize.pack_error(WorkerCrashed(f"the executor's initializer killed the process running it: "
                                                      f"{died.report}"))

    def run(self, serial: int, pickled_function, task) -> tuple:
        """Run ``task`` with the function ``serial`` in the child; returns its result tuple (FAILED with
        a WorkerCrashed saying how, if the task killed the child, which is started again)."""
        try:
            if serial not in self._functions:
                self._send(("fn", serial, pickled_function))
                self._functions[serial] = True
                while len(self._functions) > _KEPT_FUNCTIONS:
                    self._send(("forget", self._functions.popitem(last=False)[0]))
            else:
                self._functions.move_to_end(serial)
            return self._call(("run", serial, task))
        except OSError as exc:  # writing to a child that is gone
            died = self._restart(exc)
        except _Died as exc:
            died = exc
        error = serialize.pack_error(WorkerCrashed(f"the task killed the process running it: {died.report}"))
        return (task[0], FAILED, error if task[2] == CALL else (NO_VALUES, error), 0.0)

    def _call(self, message):
        try:
            self._send(message)
            return self._receive()
        except (OSError, EOFError) as exc:
            raise self._restart(exc) from None

    def _restart(self, exc: BaseException) -> _Died:
        report = self._ended(exc)
        self._spawn()
        self.restarts += 1
        return _Died(report)

    def _ended(self, exc: BaseException) -> str:
        try:
            code = self._popen.wait(5)
        except subprocess.TimeoutExpired:  # it closed its pipe but lives on: stop it
            self._popen.kill()
            code = self._popen.wait()
        for pipe in (self._popen.stdin, self._popen.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        if code >= 0:
            how = f"exited with code {code}"
        else:
            try:
                how = f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        log.warning("task process %d %s while running a task; starting another", self._popen.pid, how)
        return f"its task process {self._popen.pid} {how} (the member lives on and started another)"

    def close(self) -> None:
        """Close its stdin (the child exits after the task it runs) and wait for it, killing it after 5 s."""
        try:
            self._popen.stdin.close()
        except OSError:
            pass
        try:
            self._popen.wait(5)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait()
        self._popen.stdout.close()

    def _send(self, message) -> None:
        _write_all(self._popen.stdin, serialize.dumps(message))

    def _receive(self):
        return serialize.loads(_read_exactly(self._popen.stdout, _HEADER.unpack(
            _read_exactly(self._popen.stdout, _HEADER.size))[0]))


def _write_all(stream, data: bytes) -> None:
    """Write one message (its length, then ``data``) to an unbuffered pipe, however many writes it takes."""
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[stream.write(view):]


def _read_exactly(stream, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) < size:
        chunks = [data or b""]
        got = len(chunks[0])
        while got < size:
            chunk = stream.read(size - got)
            if not chunk:
                raise EOFError("the task process closed its pipe")
            chunks.append(chunk)
            got += len(chunk)
        data = b"".join(chunks)
    return data


# -- the child --------------------------------------------------------------------------------------------------


def _child_main() -> None:
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # the task's prints go to the member's log, never into the replies
    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the member's to handle
    functions: dict = {}

    def reply(message) -> None:
        _write_all(replies, serialize.dumps(message))

    while True:
        try:
            header = _read_exactly(requests, _HEADER.size)
            message = serialize.loads(_read_exactly(requests, _HEADER.unpack(header)[0]))
        except EOFError:
            return
        kind = message[0]
        if kind == "run":
            _, serial, task = message
            result = worker.run_task(functions.get(serial), task)
            try:
                reply(result)
            except Exception:
                reply(worker.sendable(result))
        elif kind == "fn":
            functions[message[1]] = worker.load_function(message[2])
        elif kind == "forget":
            functions.pop(message[1], None)
        elif kind == "init":
            reply(worker.run_initializer(message[1]))
        elif kind == "hello":
            _, member_info, imports = message
            if member_info is not None:
                worker.set_current_member(Member.from_wire(member_info))
            for name in imports:
                try:
                    importlib.import_module(name)
                except Exception as exc:  # the member imported it: report, and run what can run
                    print(f"task process {os.getpid()}: cannot import {name!r}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    threading.current_thread().name = "grid-task-process"
    _child_main()
