"""The command lines: `python -m cnn.main`, `cnn.predict`, `cnn.visualize` (and `cnn.sweep`).

Each parses its flags with `flags_parser`, so every usage mistake is one
`error:` line and exit status 2, and turns a ConfigError from the work into
the same.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from absl import flags, logging

from cnn.errors import ConfigError

FLAGS = flags.FLAGS


def fail(message: str) -> NoReturn:
    """One `error:` line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def flags_parser(usage: str, explain: Callable[[list[str], Exception], str] | None = None
                 ) -> Callable[[list[str]], list[str]]:
    """absl's flag parsing for `app.run`, with a mistake reported as one line plus `usage`.

    `explain(argv, error)` turns an error raised while applying a
    `--config.x=v` override (config_flags raises plain Python errors) into
    the message to show.
    """
    def parse(argv: list[str]) -> list[str]:
        try:
            return FLAGS(argv)
        except flags.Error as e:
            if isinstance(e.__context__, ConfigError):  # a flag's own parser named the mistake (say, --config's file)
                fail(str(e.__context__))
            message = str(e)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            if explain is None:
                raise
            message = explain(argv, e)
        fail(f"{message}\n{usage}")

    return parse


def quiet_logging() -> None:
    """JAX logs its backend probing at INFO: show warnings only, unless --verbosity asks for more."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
