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

T = TypeVar("T")


def progress(items: Iterable[T], total: int, description: str, unit: str = "step", every: float = 30.0,
             leave: bool = False) -> Iterator[T]:
    """Yields `items`, showing how far through `total` the loop is and how long the rest will take."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=description, leave=leave, unit=unit, dynamic_ncols=True)
        return
    start = last = time.time()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.time()
        if now - last >= every and done < total:
            last = now
            rate = done / (now - start)
            left = (total - done) / rate if rate else float("inf")
            print(f"{description}: {done}/{total} {unit}s, {rate:,.1f} {unit}/s, {format_seconds(left)} left",
                  file=sys.stderr, flush=True)


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
