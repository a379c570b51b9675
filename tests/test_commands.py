"""The `cnn` command: its subcommands, each command's short --help, and the `python -m` forms beside it.

No training here: help, usage mistakes and a bad override each stop before the first step.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from cnn.cli import commands
from conftest import REPO

NAMES = ["train", "predict", "visualize", "export", "sweep"]

# Runs `cnn NAME --help` (through the console command's function) and `python -m MODULE -h` (as runpy runs it) in one
# process, after defining a new flag in the command's module, and prints each exit status and output.
HELP_TWICE = """
import contextlib, importlib, io, json, runpy, sys
from absl import flags
from cnn.cli import commands

def shown(call):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            call()
        except SystemExit as e:
            return [e.code, out.getvalue()]
    return [None, out.getvalue()]

name, module = sys.argv[1:]
command = importlib.import_module(commands.COMMANDS[name].module)
flags.DEFINE_integer("brand_new", 7, "A flag added later.", flag_values=command.USAGE.flag_values,
                     module_name=command.__name__)
sys.argv = ["python", "-h"]
print(json.dumps([shown(lambda: commands.main([name, "--help"])),
                  shown(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True))]))
"""


def python(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name, module, own_flags", [
    ("train", "cnn.main", ["--config=FILE", "--config.SECTION.FIELD=VALUE", "--num_processes=N"]),
    ("predict", "cnn.predict", ["--top_k=N", "--invert=auto|yes|no  Invert", "--[no]frame"]),
    ("visualize", "cnn.visualize", ["--num_images=N"]),
    ("export", "cnn.export", ["--format=VALUE", "--output=VALUE", "--[no]overwrite", "--quantize=VALUE"]),
    ("sweep", "cnn.sweep", ["--pruner=none|median|hyperband", "--[no]dry_run", "--config.SECTION.FIELD=VALUE"]),
])
def test_each_command_help_is_its_own_flags_one_line_each(name, module, own_flags):
    proc = python("-c", HELP_TWICE, name, module)
    assert proc.returncode == 0, proc.stderr
    (code, text), (module_code, module_text) = json.loads(proc.stdout)
    assert code == 0 and module_code == 0
    assert text.startswith(f"usage: cnn {name} ") and module_text.startswith(f"usage: python -m {module} ")
    assert text.split("\n", 1)[1] == module_text.split("\n", 1)[1]  # the same help, each with its own command name
    lines = text.splitlines()
    assert len(lines) < 60 and "Try --helpfull" not in text
    rows = lines[lines.index("flags:") + 1:]
    for flag in ["--workdir=VALUE", "--brand_new=N", *own_flags]:
        assert sum(row.lstrip().startswith(flag) for row in rows) == 1, (flag, text)
    assert any(row.split() == ["--brand_new=N", "A", "flag", "added", "later.", "(default:", "7)"] for row in rows)


def test_cnn_help_lists_the_commands_without_loading_jax():
    code = ("import contextlib, io, json, sys\nfrom cnn.cli.commands import main\nshown = []\n"
            "for argv in (['--help'], ['-h'], []):\n    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n        try:\n            main(argv)\n"
            "        except SystemExit as e:\n            shown.append([e.code, out.getvalue()])\n"
            "heavy = [m for m in ('jax', 'flax', 'matplotlib', 'optuna', 'tensorflow') if m in sys.modules]\n"
            "print(json.dumps([shown, heavy]))")
    proc = python("-c", code)
    shown, heavy = json.loads(proc.stdout)
    assert heavy == []
    assert len(shown) == 3 and all(code == 0 for code, _ in shown) and len({text for _, text in shown}) == 1
    listed = [line.split()[0] for line in shown[0][1].split("commands:\n", 1)[1].splitlines()]
    assert listed == NAMES == list(commands.COMMANDS)


def test_an_unknown_command_is_one_line_and_status_2():
    proc = python("-m", "cnn", "trian", "--workdir=x")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: 'trian' is not a cnn command; did you mean 'train'? the commands: "
                                  "train, predict, visualize, export, sweep")


def test_cnn_train_reports_a_bad_override_as_python_m_cnn_main_does(tmp_path):
    args = ["--config=configs/digits.py", f"--workdir={tmp_path}", "--config.train.nope=1"]
    new, old = python("-m", "cnn", "train", *args), python("-m", "cnn.main", *args)
    assert new.returncode == old.returncode == 2
    (error, usage), (old_error, old_usage) = new.stderr.splitlines(), old.stderr.splitlines()
    assert error == old_error and error.startswith("error: --config.train.nope: train has no field 'nope'")
    assert usage.replace("usage: cnn train ", "usage: python -m cnn.main ") == old_usage
    assert not any(tmp_path.iterdir())


def test_pyproject_declares_the_cnn_script_as_this_function():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["cnn"]
    module, function = target.split(":")
    assert getattr(importlib.import_module(module), function) is commands.main
    assert importlib.import_module("cnn.__main__").main is commands.main  # `python -m cnn`


def test_the_installed_cnn_script_lists_the_commands():
    script = shutil.which("cnn", path=os.path.dirname(sys.executable))  # pip install puts it beside python
    if script is None:
        pytest.skip("no cnn script beside this python: pip install -e . creates it")
    proc = subprocess.run([script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.split("commands:\n", 1)[1].splitlines()] == NAMES
