"""Shared fixtures: the sim's ``local_cluster`` factory and a leak check after every test."""

from __future__ import annotations

import os
import threading
import time

import pytest

pytest_plugins = ["sim.fixtures"]

_OWNED_PREFIXES = ("grid-",)


def _grid_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(_OWNED_PREFIXES) and t.is_alive()}


def child_pids() -> set[int]:
    """Live children of this process (from /proc)."""
    pids = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{task}/children") as children:
                pids.update(int(pid) for pid in children.read().split())
        except OSError:
            continue
    return pids


def wait_for(predicate, timeout: float = 10.0, message: str = "condition"):
    """Poll ``predicate`` until it is truthy (returned) or the deadline passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        event.wait(0.01)


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test leaves no grid thread and no child process behind."""
    threads_before = _grid_threads()
    children_before = child_pids()
    yield
    leaked = lambda: _grid_threads() - threads_before  # noqa: E731
    deadline = time.monotonic() + 5
    while leaked() and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert not leaked(), f"threads left behind: {sorted(t.name for t in leaked())}"
    zombies = lambda: child_pids() - children_before  # noqa: E731
    while zombies() and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert not zombies(), f"child processes left behind: {sorted(zombies())}"
