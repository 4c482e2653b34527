"""Task functions for tests/test_executor.py, importable by name on every member.

Members import this module by reference (``tests.executor_helpers``), so a module
global set by an executor's initializer is visible to the tasks that run after it.
"""

from __future__ import annotations

import os
import threading
import time

import grid

GATE_TIMEOUT = 30.0  # seconds a gated task waits for its gate before failing

initialized_with = None  # set by ``initialize`` on the member that ran it


def initialize(token) -> None:
    """An executor initializer: remembers ``token`` in this module on the member."""
    global initialized_with
    initialized_with = token


def initialized_token():
    """What ``initialize`` stored on the member running this task (None if it never ran)."""
    return initialized_with


def identity(value):
    return value


def add(a, b=0, *, c=0):
    return a + b + c


def square(x):
    return x * x


def fail_at(x, bad):
    """``x`` unless ``x == bad``, which raises ValueError naming it."""
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x


def describe_buffer(value) -> tuple:
    """The type name, length and first/last bytes of a buffer argument."""
    view = memoryview(value)
    return type(value).__name__, view.nbytes, bytes(view[:4]), bytes(view[-4:])


def member_uuid() -> str:
    """The uuid of the member running this task."""
    return grid.current_member().uuid


def simulated_work(x, seconds: float):
    """``x``, after ``seconds`` of simulated work (an I/O-bound task, not a wait for a state)."""
    end = time.perf_counter() + seconds
    threading.Event().wait(seconds)
    while time.perf_counter() < end:
        pass
    return x


def gated(gate: str, value=None, marker: str | None = None):
    """Block until the file ``gate`` exists, then create ``marker`` (if given) and return ``value``.

    Raises:
        TimeoutError: the gate did not open within GATE_TIMEOUT seconds.
    """
    deadline = time.monotonic() + GATE_TIMEOUT
    pause = threading.Event()
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} did not open within {GATE_TIMEOUT} s")
        pause.wait(0.002)
    if marker is not None:
        with open(marker, "w") as file:
            file.write(str(os.getpid()))
    return value


def make_lock():
    """A result that cannot be pickled."""
    return threading.Lock()


def crash(code: int):
    """Kill the member process running this task at once with exit code ``code``."""
    os._exit(code)


def fail_to_initialize():
    """An executor initializer that fails."""
    raise RuntimeError("initializer failed on purpose")


def lock_at(x, bad):
    """``x``, or an unpicklable lock when ``x == bad``."""
    return threading.Lock() if x == bad else x


def explode():
    """Raises when called: an object reduced to it cannot be unpickled anywhere."""
    raise RuntimeError("this object cannot be unpickled")


class Undecodable:
    """Pickles fine here; unpickling it (on a member) raises."""

    def __reduce__(self):
        return (explode, ())


def make_undecodable(value=None):
    """``value``, or (None) a result that pickles on the member and cannot be unpickled by the caller."""
    return Undecodable() if value is None else value


class Payload:
    """An argument or result a test holds a weak reference to (it pickles by reference to this module)."""

    def __init__(self, size: int = 1000):
        self.data = bytes(size)


def make_payload(size: int = 1000) -> Payload:
    return Payload(size)


def say(text: str, stream: str = "stdout", gate: str | None = None):
    """``print(text)`` to the member's stdout or stderr; then, if ``gate`` is given, wait for it."""
    import sys

    print(text, file=getattr(sys, stream))
    if gate is not None:
        gated(gate)
    return text


def slow_gated(gate: str, value=None, marker: str | None = None):
    """``gated``, after 5 ms of work: a task slow enough that the executor keeps few of them in flight."""
    simulated_work(None, 0.005)
    return gated(gate, value, marker)


def job_on_a_gate(payload):
    """A job for grid.jobs: ``(gate, marker, value)``: note this process's pid in ``marker``, wait for
    ``gate`` (if given), give ``value`` squared; a plain number is just squared."""
    if not isinstance(payload, tuple):
        return payload * payload
    gate, marker, value = payload
    with open(marker, "w") as file:
        file.write(str(os.getpid()))
    if gate is not None:
        gated(gate)
    return value * value
