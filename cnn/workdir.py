"""The workdir's files: their names, writing them atomically, and reading them back.

Every file cnn writes goes through `write_atomic`: the content goes to a
temporary file beside the target, which is then renamed over it, so a crash,
a kill or a full disk leaves either the old file or the new one, never half
of one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from cnn.errors import ConfigError

CONFIG = "config.json"
SUMMARY = "summary.txt"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
RESULTS = "results.json"
CHECKPOINTS = "checkpoints"
PLOTS = "plots"


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside `path` (same extension) to write; renames it onto `path` if all went well."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.{os.getpid()}.tmp{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str, content: str | bytes) -> None:
    """Writes `content` to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp, open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)


def write_json(path: str, content: Any) -> None:
    write_atomic(path, json.dumps(content, indent=2) + "\n")


def read_json(path: str) -> Any:
    """The file's JSON content, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_writable(workdir: str, field: str = "workdir") -> None:
    """Fails before any work if `workdir` cannot be created or written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{field}={workdir!r} is not writable ({e.strerror}); choose a folder you can write to") \
            from None
