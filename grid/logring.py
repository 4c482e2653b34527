"""A member's recent log lines, kept in memory for ``python -m grid logs``.

::

    the "grid" logger --> LogRing (a logging.Handler): (seq, time, level, logger, text), the newest 2,000
    "logs" request {after, level, lines} --> the lines after seq ``after`` at ``level`` or above, the last ``lines``
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading

LINES_KEPT = 2_000


class LogRing(logging.Handler):
    """The newest ``size`` log records of this process's "grid" loggers, numbered."""

    def __init__(self, size: int = LINES_KEPT):
        super().__init__(level=logging.DEBUG)
        self._lines: collections.deque = collections.deque(maxlen=size)
        self._numbers = itertools.count(1)
        self._ring_lock = threading.Lock()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a record whose arguments do not format: keep what there is
            text = str(record.msg)
        with self._ring_lock:
            self._lines.append((next(self._numbers), record.created, record.levelno, record.name, text))

    def lines(self, after: int = 0, level: int = 0, limit: int | None = None) -> list:
        """``[(seq, time, level number, logger, text)]`` after seq ``after``, at ``level`` or above, the last ``limit``."""
        with self._ring_lock:
            found = [line for line in self._lines if line[0] > after and line[2] >= level]
        return found[-limit:] if limit else found

    def answer(self, body) -> list:
        """The "logs" request's answer; ``body`` is ``{"after", "level", "lines"}`` (each optional)."""
        body = body if isinstance(body, dict) else {}
        after, level, limit = body.get("after", 0), body.get("level", 0), body.get("lines")
        if not isinstance(after, int) or not isinstance(level, int) or limit is not None and not isinstance(limit, int):
            raise ValueError(f"a 'logs' body is {{after: int, level: int, lines: int or None}}, not {body!r}")
        return self.lines(after, level, limit)
