"""``map(..., progress=True)``: a progress bar on stderr as the results are taken, tqdm's if it is
installed, else a line of the standard library's, redrawn at most 10 times a second.

Sized inputs (a list, a range) show ``done/total``; any other iterable shows the count so far.
"""

from __future__ import annotations

import sys
import time

_REDRAW = 0.1  # seconds between redraws of the plain line


def total_of(iterables) -> int | None:
    """The number of items ``map(fn, *iterables)`` gives, if every iterable is sized; else None."""
    try:
        return min(len(iterable) for iterable in iterables)
    except TypeError:  # (an iterator, a generator: no len)
        return None


def with_progress(results, total: int | None, description: str = "map"):
    """Yield ``results``, drawing the progress on stderr; the bar is closed with the iterator."""
    bar = _bar(total, description)
    try:
        for result in results:
            bar.update(1)
            yield result
    finally:
        bar.close()
        close = getattr(results, "close", None)
        if close is not None:
            close()


def _bar(total: int | None, description: str):
    try:
        import tqdm
    except ImportError:
        return _PlainBar(total, description)
    return tqdm.tqdm(total=total, desc=description, unit="item", file=sys.stderr, dynamic_ncols=True)


class _PlainBar:
    """``description: done/total items`` (or ``done items``) on one line of stderr, redrawn in place."""

    def __init__(self, total: int | None, description: str):
        self.total, self.description, self.done = total, description, 0
        self._drawn_at = 0.0
        self._start = time.monotonic()
        self._draw()

    def update(self, count: int) -> None:
        self.done += count
        if time.monotonic() - self._drawn_at >= _REDRAW:
            self._draw()

    def _draw(self) -> None:
        self._drawn_at = time.monotonic()
        of = f"/{self.total}" if self.total is not None else ""
        rate = self.done / max(self._drawn_at - self._start, 1e-9)
        sys.stderr.write(f"\r{self.description}: {self.done}{of} items ({rate:.0f}/s)")
        sys.stderr.flush()

    def close(self) -> None:
        self._draw()
        sys.stderr.write("\n")
        sys.stderr.flush()
