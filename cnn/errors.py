"""The exceptions a run can end with, and the checks that raise them for bad values.

Every module reports a user's mistake as a `ConfigError` whose message names
the field, the bad value and what would work; a diverged run and a failed
write are `UserError`s too, not config mistakes. The command lines print any
`UserError` as one line and exit with status 2. This module imports nothing of cnn, so any
module may use it.
"""

from __future__ import annotations

import numbers
from typing import Any


class UserError(Exception):
    """A run ended for a reason its user can act on, said in one line: the command lines print it as
    `error: ...` and exit with status 2, with no traceback."""


class ConfigError(UserError, ValueError):
    """A problem the user can fix by changing the config, the command line or the files they point at."""


class ShapeError(ConfigError):
    """A layer does not fit the shape of its input; the message reads 'what does not fit; what to do'."""


class Diverged(UserError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


class WriteFailed(UserError):
    """A file of the run could not be written (a full disk, a lost mount); what was written before it is intact."""


class Preempted(Exception):
    """SIGTERM or Ctrl-C arrived; a checkpoint was saved and the same command resumes.

    `exit_status` is the shell's convention for that signal: 143 (SIGTERM), 130 (Ctrl-C).
    """

    def __init__(self, message: str, exit_status: int = 143):
        super().__init__(message)
        self.exit_status = exit_status


class Pruned(Exception):
    """A sweep's pruner stopped the trial at an epoch end, after saving its checkpoint (cnn.main exits with 3)."""


def require(ok: bool, field: str, value: Any, expected: str) -> None:
    """Raises the standard message for a bad value: `field=value is not valid: expected ...`."""
    if not ok:
        raise ConfigError(f"{field}={value!r} is not valid: expected {expected}")


def is_int(value: Any) -> bool:
    """A whole number that is not a bool (True is an int in Python, never a sensible count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_at_least(value: Any, field: str, low: int = 1, expected: str | None = None) -> int:
    """`value` if it is an integer >= `low`; else a ConfigError naming `field`."""
    require(is_int(value) and value >= low, field, value,
            expected or ("a positive integer" if low == 1 else f"an integer >= {low}"))
    return int(value)


def int_tuple(value: Any, field: str, length: int | None = None) -> tuple[int, ...]:
    """A positive integer repeated `length` times, or a tuple of `length` positive integers (any length if None)."""
    values = (value,) * length if length and is_int(value) else value
    ok = (isinstance(values, (tuple, list)) and len(values) > 0 and (length is None or len(values) == length)
          and all(is_int(v) and v > 0 for v in values))
    what = f"a positive integer or a tuple of {length} positive integers" if length else \
        "a non-empty tuple of positive integers"
    require(ok, field, value, what)
    return tuple(int(v) for v in values)
