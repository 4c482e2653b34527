"""A member's metrics: counters that only grow, recent durations, and rates over the last seconds.

``Peer.status()["metrics"]`` gathers them (``python -m grid status --json`` and the dashboard read
them): tasks done and tasks/s, task run-time percentiles over the last 1,000 tasks, data ops per
structure kind and per structure, snapshots sent and received (migrations), bytes read and written
on its links, and the median heartbeat round trip to each member (a heartbeat asks for an echo
every 5 s).
"""

from __future__ import annotations

import collections
import threading
import time

DURATIONS_KEPT = 1_000
RATE_WINDOW = 10.0  # seconds a rate is taken over (at least one second of samples)


def percentiles(values, points=(50, 90, 99)) -> dict:
    """``{"p50": ..., ...}`` of ``values`` by nearest rank; None each when there are none."""
    ordered = sorted(values)
    if not ordered:
        return {f"p{point}": None for point in points}
    return {f"p{point}": ordered[min(len(ordered) - 1, max(0, -(-point * len(ordered) // 100) - 1))]
            for point in points}


class Rates:
    """Rates of counters over the last ``RATE_WINDOW`` seconds, from samples taken when asked."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._samples: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def rate(self, name: str, value: float) -> float | None:
        """Per second, of counter ``name`` now at ``value``: over the oldest sample still in the
        window; None until a sample a second old or more exists."""
        now = self._clock()
        with self._lock:
            samples = self._samples.setdefault(name, collections.deque())
            while len(samples) > 1 and now - samples[1][0] >= RATE_WINDOW:
                samples.popleft()
            samples.append((now, value))
            then, before = samples[0]
        if now - then < 1.0:
            return None
        return (value - before) / (now - then)
