"""Task functions for tests/test_member_faults.py, importable by name on every member."""

from __future__ import annotations

import os
import threading
import time

_calls = 0  # calls of quick_then_slow on this member


def quick_then_slow(quick_runs: int, seconds: float) -> int:
    """Return this member's pid at once for the first ``quick_runs`` calls here, then after
    ``seconds`` of work (a function that was quick, then turns slow)."""
    global _calls
    _calls += 1
    if _calls > quick_runs:
        threading.Event().wait(seconds)  # the task's own work, not a wait for a state
    return os.getpid()


def exit_now(code: int):
    """Kill the member process running this task at once (a poison task)."""
    os._exit(code)


def pid() -> int:
    return os.getpid()


def wait_for_file(path: str, timeout: float = 30.0) -> str:
    """Return ``path`` once the file exists (a gated task); TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        pause.wait(0.005)
    return path


class ThreadProbe:
    """A task argument that notes which thread unpickled it (its ``__setstate__`` is user code)."""

    def __init__(self):
        self.unpickled_on = None

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.unpickled_on = threading.current_thread().name


def unpickled_on(probe: ThreadProbe) -> str:
    return probe.unpickled_on
