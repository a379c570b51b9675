"""`cnn COMMAND [FLAGS ...]`: the one console command; each subcommand is a module of cnn/cli with `command(argv)`.

A subcommand's module is imported only when it runs, so `cnn --help` starts
in a fraction of a second and `cnn sweep` never loads JAX. Adding one is an
entry in COMMANDS.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import NamedTuple, NoReturn

from cnn.cli import HELP_FLAGS, fail


class Command(NamedTuple):
    module: str  # defines the flags and `command(argv)`
    summary: str  # its line in `cnn --help`


COMMANDS = {
    "train": Command("cnn.cli.main", "train a config, evaluate it and draw its pictures (python -m cnn.main)"),
    "predict": Command("cnn.cli.predict", "print the top classes of image files with a trained run (python -m "
                                          "cnn.predict)"),
    "visualize": Command("cnn.cli.visualize", "redraw a run's pictures from its newest checkpoint, or show where it "
                                              "looked in image files (--explain) (python -m cnn.visualize)"),
    "export": Command("cnn.cli.export", "write a trained model as StableHLO, SavedModel, TFLite or ONNX (python -m "
                                        "cnn.export)"),
    "sweep": Command("cnn.cli.sweep", "run or join the Optuna study of a sweep file (python -m cnn.sweep)"),
}


def overview() -> str:
    """`cnn --help`: the subcommands, one line each."""
    width = max(map(len, COMMANDS))
    return "\n".join(["usage: cnn COMMAND [FLAGS ...]    (cnn COMMAND --help: its flags)", "", "commands:",
                      *(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items())])


def main(argv: list[str] | None = None) -> NoReturn:
    """Runs `cnn COMMAND ARGS` as `python -m cnn.<module> ARGS` would; `argv` defaults to sys.argv[1:]."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in HELP_FLAGS:
        print(overview())
        sys.exit(0)
    name, *rest = args
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        fail(f"{name!r} is not a cnn command; {hint}the commands: {', '.join(COMMANDS)} (cnn --help says what each "
             "does)")
    if name == "train" and argv is None:  # this process is the command's own: restart it as python -m cnn.main does
        from cnn import runtime

        runtime.restart_with_allocator()
    importlib.import_module(COMMANDS[name].module).command([f"cnn {name}", *rest])
    sys.exit(0)
