"""The command lines: `cnn train|predict|visualize|export|sweep` (cnn/cli/commands.py), also `python -m cnn.main` etc.

Each parses its flags with `flags_parser`, so every usage mistake is one
`error:` line and exit status 2, and turns a ConfigError from the work into
the same; `--help` (or `-h`) shows the command's own flags, one line each,
read from absl, and `--helpfull` absl's whole list.
"""

from __future__ import annotations

import dataclasses
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


HELP_FLAGS = ("-h", "--help", "-?", "--helpshort")  # --helpfull stays absl's
_PLACEHOLDERS = {"int": "N", "float": "X", "config object": "FILE"}


@dataclasses.dataclass(frozen=True)
class Usage:
    """What a command's `--help` and its usage mistakes show; `argv[0]` is the command as typed (`cnn train`)."""

    module: str  # the module that defines the command's flags: its __name__; its docstring heads the help
    args: str  # the usage line after the command's name
    overrides: str | None = None  # what --config.SECTION.FIELD=VALUE does, for a command that takes them
    flag_values: flags.FlagValues = FLAGS

    def line(self, prog: str) -> str:
        return f"usage: {prog} {self.args}"

    def help(self, prog: str) -> str:
        """The usage line, the module's docstring, then each flag the module defines with its help on one line."""
        rows = [(_form(flag), _help(flag)) for flag in self.flag_values.get_flags_for_module(self.module)]
        if self.overrides:
            after = next((i + 1 for i, (form, _) in enumerate(rows) if form.startswith("--config=")), len(rows))
            rows.insert(after, ("--config.SECTION.FIELD=VALUE", self.overrides))
        if self.flag_values is FLAGS:  # absl's app.run defines its own there
            rows.append(("--helpfull", "Every flag, absl's own (--verbosity, ...) too."))
        width = max(len(form) for form, _ in rows)
        doc = (sys.modules[self.module].__doc__ or "").strip()
        return "\n".join([self.line(prog), "", doc, "", "flags:", *(f"  {f:<{width}}  {h}" for f, h in rows)])


def wants_help(argv: list[str]) -> bool:
    """`-h`, `--help` (or absl's `-?`, `--helpshort`) before any `--`."""
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    return any(arg in HELP_FLAGS for arg in args)


def _form(flag: flags.Flag) -> str:
    if flag.boolean:
        return f"--[no]{flag.name}"
    choices = getattr(flag.parser, "enum_values", None)
    return f"--{flag.name}={'|'.join(choices) if choices else _PLACEHOLDERS.get(flag.flag_type(), 'VALUE')}"


def _help(flag: flags.Flag) -> str:
    """The flag's help on one line, without the `<a|b>: ` absl puts before an enum's, and its default."""
    text = " ".join(flag.help.split())
    choices = getattr(flag.parser, "enum_values", None)
    if choices:
        text = text.removeprefix(f"<{'|'.join(choices)}>: ")
    if flag.boolean:
        return text + (" (default: on)" if flag.default else "")
    return text + ("" if flag.default is None else f" (default: {flag.default})")


def flags_parser(usage: Usage, explain: Callable[[list[str], Exception], str] | None = None
                 ) -> Callable[[list[str]], list[str]]:
    """absl's flag parsing for `app.run`: `--help` is the command's own, a mistake one line plus the usage.

    `explain(argv, error)` turns an error raised while applying a
    `--config.x=v` override (config_flags raises plain Python errors) into
    the message to show.
    """
    def parse(argv: list[str]) -> list[str]:
        if wants_help(argv):
            print(usage.help(argv[0]))
            sys.exit(0)
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
        fail(f"{message}\n{usage.line(argv[0])}")

    return parse


def quiet_logging() -> None:
    """JAX logs its backend probing at INFO: show warnings only, unless --verbosity asks for more."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
