"""Progress for long work: a bar on a terminal, periodic plain lines in logs.

A bar (tqdm) redraws in place, which is right for a person at a terminal but
fills CI and cluster logs with carriage returns; when stderr is not a
terminal the same loop prints one line every `every` seconds instead, with
the rate and the time left.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


class Progress:
    """Counts work done out of `total`; `update(n)` after each piece, `close()` at the end."""

    def __init__(self, total: int, description: str, unit: str = "step", every: float = 30.0,
                 leave: bool = False):
        self.total, self.description, self.unit, self.every = total, description, unit, every
        self.done = 0
        self.start = self.last = time.time()
        self._bar = None
        if sys.stderr.isatty():
            self._bar = tqdm(total=total, desc=description, leave=leave, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.time()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.start)
            left = (self.total - self.done) / rate if rate else float("inf")
            print(f"{self.description}: {self.done}/{self.total} {self.unit}s, {rate:,.1f} {self.unit}/s, "
                  f"{format_seconds(left)} left", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def progress(items: Iterable[T], total: int, description: str, unit: str = "step", every: float = 30.0,
             leave: bool = False) -> Iterator[T]:
    """Yields `items`, showing how far through `total` the loop is and how long the rest will take."""
    bar = Progress(total, description, unit, every, leave)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()


def format_seconds(seconds: float) -> str:
    """'42s', '3m05s' or '1h02m': short enough for a log line."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
