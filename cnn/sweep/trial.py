"""One trial as its own `cnn.main` process: started by a worker, reporting each epoch to the study itself.

The process gets the trial's identity in environment variables, so the
command line stays the one a user could type, and `cnn.main` imports Optuna
only when they are set. The trial folder's workdir lock (cnn.workdir.hold)
is taken by the worker and inherited by the process, which recognises it
($CNN_WORKDIR_LOCK_FD): while either lives, no other worker starts the trial
again and no other cnn.main runs there (on a shared filesystem too), and
once both are gone any worker may resume it from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

from cnn import workdir as workdir_lib
from cnn.errors import Pruned

STORAGE, STUDY, TRIAL, PRUNER = "CNN_SWEEP_STORAGE", "CNN_SWEEP_STUDY", "CNN_SWEEP_TRIAL", "CNN_SWEEP_PRUNER"
PRUNED_EXIT = 3  # cnn.main's status for Pruned
STOPPED_EXITS = (130, 143, -2, -15)  # interrupted or SIGTERM: the checkpoint stays, the trial can resume


def make_pruner(name: str, startup_trials: int):
    """--pruner as an Optuna pruner; epochs are its steps."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def reporter_from_env() -> Callable[[dict], None] | None:
    """In a trial process: reports each epoch's metric to the study and raises Pruned when the pruner says so.

    None outside a sweep. The study's metric and startup count come from the
    study itself, so every process of a sweep judges by the same rules.
    """
    name = os.environ.get(STUDY)
    if not name:
        return None
    import optuna

    from cnn.sweep.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(os.environ[STORAGE])
    settings = storage.get_study_user_attrs(storage.get_study_id_from_name(name))["cnn_sweep"]
    study = optuna.load_study(study_name=name, storage=storage,
                              pruner=make_pruner(os.environ.get(PRUNER, "none"), settings["startup_trials"]))
    number = int(os.environ[TRIAL])
    trial = optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(name), number))
    metric = settings["metric"]

    def report(record: dict) -> None:
        if not isinstance(record.get(metric), (int, float)):
            return  # a metric only results.json has (say train_seconds): nothing to judge by per epoch
        trial.report(float(record[metric]), int(record["epoch"]))
        if trial.should_prune():
            raise Pruned(f"pruned by the sweep at epoch {record['epoch']}: {metric} {record[metric]:.4g} is "
                         f"behind the other trials of study {name!r} (trial {number})")

    return report


@dataclasses.dataclass
class Running:
    """A trial this worker holds: its folder is locked from claiming until the worker is done with it."""

    number: int
    params: dict[str, Any]
    workdir: str
    lock: int  # the descriptor of the folder's workdir lock (cnn.workdir.try_lock)
    resumed: bool = False
    proc: subprocess.Popen | None = None
    started: float = 0.0


def start(trial: Running, command: list[str], env: dict[str, str]) -> None:
    """Starts the trial's process, its output appended to WORKDIR/log.txt; the folder's lock goes with it."""
    with open(os.path.join(trial.workdir, "log.txt"), "a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: {shlex.join(command)}\n")
        log.flush()
        # A session of its own: Ctrl-C in the terminal reaches the worker, which stops the trial with SIGTERM.
        trial.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**env, workdir_lib.LOCK_FD: str(trial.lock)}, start_new_session=True,
                                    pass_fds=(trial.lock,))
    trial.started = time.time()


def release(trial: Running) -> None:
    os.close(trial.lock)


def read_results(workdir: str, folds: int | None = None) -> dict[str, Any]:
    """The trial's results.json; for a cross-validating trial (`folds`), the folds' means in cv_results.json."""
    if folds:
        summary = workdir_lib.read_json(os.path.join(workdir, workdir_lib.CV_RESULTS))
        return summary["mean"] if isinstance(summary, dict) and summary.get("complete") else {}
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def log_tail(workdir: str, lines: int = 6) -> str:
    try:
        with open(os.path.join(workdir, "log.txt"), errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no log)"
