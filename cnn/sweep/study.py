"""A worker of a study: it claims trials under the study's lock and runs up to --workers of them at once.

Optuna's `optimize` is not used: it counts trials per worker, marks a trial
stopped by SIGTERM as failed, and cannot take over a trial whose worker
died. Here the study holds at most --n_trials trials whichever workers run
them, a stopped or orphaned trial stays RUNNING, and the next worker that
can take its folder's lock resumes it from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any, ContextManager

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from cnn import workdir as workdir_lib
from cnn.errors import ConfigError
from cnn.progress import format_seconds
from cnn.sweep import storage as storage_lib
from cnn.sweep import trial as trial_lib
from cnn.sweep.space import Sweep, command, trial_dir, trial_name

SETTINGS = "cnn_sweep"  # the study's user attribute holding Sweep.settings() and its token


@dataclasses.dataclass
class Worker:
    """This process's part in a study: what it claims trials with, and how they have gone so far."""

    sweep: Sweep
    spec: str  # the storage, resolved
    study: optuna.Study
    storage: optuna.storages.BaseStorage
    # Results are told through a study with a plain sampler: GridSampler's after_trial calls study.stop()
    # once the grid is used up, which raises outside Optuna's own optimize loop.
    teller: optuna.Study
    token: str  # names this study in each trial.json: a folder of another study is never reused
    study_id: int
    workdir: str
    n_trials: int
    grid: bool  # grid trials are named by their values
    pruner: str
    workers: int
    extra: list[str]
    lock: Callable[[], ContextManager[None]]
    failures: int = 0
    fatal: str | None = None  # a mistake every trial would repeat: stop claiming


def make_sampler(sweep: Sweep, name: str | None) -> tuple[str, optuna.samplers.BaseSampler]:
    """--sampler: grid for lists and trial lists, TPE once a range is in the space."""
    name = name or ("grid" if sweep.is_grid_space else "tpe")
    if sweep.grid is not None and name != "grid":
        raise ConfigError(f"--sampler={name}: {sweep.path} lists its trials (trials=...), which run as a grid; "
                          "give get_sweep() a space to search instead")
    if name == "grid":
        ranged = next((k for k, d in sweep.space.items() if not isinstance(d, CategoricalDistribution)), None)
        if ranged:
            raise ConfigError(f"--sampler=grid needs lists of values, but {ranged} is a range "
                              f"({sweep.space[ranged]}); use --sampler=tpe or random, or list its values")
        if sweep.grid is not None:  # the trials are given: the sampler is never asked
            return name, optuna.samplers.RandomSampler()
        return name, optuna.samplers.GridSampler({k: list(d.choices) for k, d in sweep.space.items()})
    if name == "random":
        return name, optuna.samplers.RandomSampler()
    # constant_liar: concurrent trials count as bad guesses, so parallel workers spread out.
    return name, optuna.samplers.TPESampler(n_startup_trials=sweep.startup_trials, constant_liar=True)


def trial_count(sweep: Sweep, grid: bool, n_trials: int | None) -> int:
    size = len(sweep.grid_points()) if grid else None
    n = n_trials or sweep.n_trials or size
    if n is None:
        raise ConfigError(f"--n_trials is needed: {sweep.path} searches a space without an end; pass "
                          "--n_trials=N or set n_trials in get_sweep()")
    if size is not None and n > size:
        raise ConfigError(f"--n_trials={n} is more than the {size} trials of {sweep.path}'s grid; "
                          f"use at most {size}")
    return n


def open_worker(sweep: Sweep, spec: str, workdir: str, sampler: str | None, n_trials: int | None, pruner: str,
                workers: int, extra: list[str]) -> Worker:
    """Creates or joins the study named after the sweep file, refusing one started with other settings."""
    name, sampler_obj = make_sampler(sweep, sampler)
    count = trial_count(sweep, name == "grid", n_trials)
    lock = storage_lib.claim_lock(spec)
    settings = {**sweep.settings(), "grid": name == "grid"}
    with lock():  # also keeps two first workers from creating Optuna's tables at once
        storage = storage_lib.open_storage(spec)
        study = optuna.create_study(storage=storage, study_name=sweep.name, sampler=sampler_obj,
                                    direction="maximize" if sweep.goal == "max" else "minimize", load_if_exists=True)
        before = study.user_attrs.get(SETTINGS)
        if before is None:
            before = {**settings, "token": uuid.uuid4().hex}
            study.set_user_attr(SETTINGS, before)
    differ = next((k for k in settings if before.get(k) != settings[k]), None)
    if differ:
        raise ConfigError(f"study {sweep.name!r} in {storage_lib.shown(spec)} was started with other settings "
                          f"({differ}: {before.get(differ)!r} there, {settings[differ]!r} here); restore them, or "
                          "start a new study with another --workdir or --storage")
    teller = optuna.load_study(study_name=sweep.name, storage=storage, sampler=optuna.samplers.RandomSampler())
    worker = Worker(sweep=sweep, spec=spec, study=study, storage=storage, teller=teller, token=before["token"],
                    study_id=storage.get_study_id_from_name(sweep.name), workdir=os.path.abspath(workdir),
                    n_trials=count, grid=name == "grid", pruner=pruner, workers=workers, extra=extra, lock=lock)
    _check_folders(worker)
    return worker


def _check_folders(worker: Worker) -> None:
    """A trial folder of another study (another file, or a deleted journal) would be resumed as this one's."""
    for entry in sorted(os.listdir(worker.workdir)):
        record = os.path.join(worker.workdir, entry, "trial.json")
        if not os.path.isfile(record):
            continue
        with open(record) as f:
            found = json.load(f)
        if found.get("token") != worker.token:
            raise ConfigError(f"{os.path.dirname(record)} is a trial of another study ({found.get('study')!r} in "
                              f"{found.get('storage')}); use a new --workdir, or that study's --storage")


def _adoptable(worker: Worker, trials: list[optuna.trial.FrozenTrial]) -> trial_lib.Running | None:
    """A RUNNING trial whose folder is here and unlocked: its worker and process are gone."""
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        path = trial_dir(worker.sweep, worker.workdir, t.number, t.params, worker.grid)
        if os.path.isdir(path) and (lock := workdir_lib.try_lock(path)) is not None:
            return trial_lib.Running(t.number, dict(t.params), path, lock.fd, resumed=True)
    return None


def _new_trial(worker: Worker, trials: list[optuna.trial.FrozenTrial]) -> tuple[int, dict[str, Any]] | None:
    study, sweep = worker.study, worker.sweep
    if len(trials) >= worker.n_trials:
        return None
    if sweep.grid is None:
        trial = study.ask(sweep.space)  # every value drawn here, under the lock
        return trial.number, trial.params
    present = {trial_name(sweep.ordered(t.params)) for t in trials}
    listed = next((t for t in sweep.grid if trial_name(t) not in present), None)
    if listed is None:
        return None
    study.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING, params=listed,
                                              distributions={k: sweep.space[k] for k in listed}))
    return study.get_trials(deepcopy=False)[-1].number, listed


def claim(worker: Worker) -> trial_lib.Running | None:
    """The next trial for this worker: an orphaned one first, then a new one while the study has room."""
    with worker.lock():
        trials = worker.study.get_trials(deepcopy=False)
        trial = _adoptable(worker, trials)
        if trial is not None:
            return trial
        new = _new_trial(worker, trials)
        if new is None:
            return None
        number, params = new
        path = trial_dir(worker.sweep, worker.workdir, number, params, worker.grid)
        lock = workdir_lib.try_lock(path)  # the workdir lock cnn.main takes: the trial's process inherits it
        trial_id = worker.storage.get_trial_id_from_study_id_trial_number(worker.study_id, number)
        if lock is None:  # not a sweep's process: say, a SLURM array's cnn.main still running there
            worker.teller.tell(number, state=TrialState.FAIL)
            worker.fatal = (f"{path} is in use by {workdir_lib.describe_holder(workdir_lib.holder(path))}; let it "
                            "finish, then run the sweep again")
            return None
        worker.storage.set_trial_user_attr(trial_id, "workdir", path)
        worker.storage.set_trial_user_attr(trial_id, "worker", f"{socket.gethostname()}:{os.getpid()}")
    with open(os.path.join(path, "trial.json"), "w") as f:
        json.dump({"study": worker.sweep.name, "storage": storage_lib.shown(worker.spec), "token": worker.token,
                   "number": number, "config": worker.sweep.config_name,
                   "overrides": {**worker.sweep.fixed, **params}}, f, indent=2)
    return trial_lib.Running(number, dict(params), path, lock.fd)


def _env(worker: Worker, number: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update({trial_lib.STORAGE: worker.spec, trial_lib.STUDY: worker.sweep.name, trial_lib.TRIAL: str(number),
                trial_lib.PRUNER: worker.pruner})
    # JAX takes 75% of a GPU's memory per process; trials sharing one must not.
    if worker.workers > 1 and not any(v in env for v in ("XLA_PYTHON_CLIENT_PREALLOCATE",
                                                         "XLA_PYTHON_CLIENT_MEM_FRACTION")):
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def _launch(worker: Worker, trial: trial_lib.Running, log: Callable[[str], None]) -> None:
    trial_lib.start(trial, command(worker.sweep, trial.workdir, trial.params, worker.extra), _env(worker, trial.number))
    values = ", ".join(f"{k}={v}" for k, v in worker.sweep.ordered(trial.params).items())
    log(f"sweep: trial {trial.number} {'resumed' if trial.resumed else 'started'} in {trial.workdir} ({values})")


def _numbers(results: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def finish(worker: Worker, trial: trial_lib.Running, stopping: bool, log: Callable[[str], None]) -> str:
    """Tells the study how the trial's process ended; returns the trial's state now ('RUNNING': it can resume)."""
    code, metric, number = trial.proc.returncode, worker.sweep.metric, trial.number
    took = format_seconds(time.time() - trial.started)
    state, note = TrialState.FAIL, f"exit {code}"
    if code == 0:
        results = _numbers(trial_lib.read_results(trial.workdir, worker.sweep.folds))
        if metric in results:
            trial_id = worker.storage.get_trial_id_from_study_id_trial_number(worker.study_id, number)
            worker.storage.set_trial_user_attr(trial_id, "results", results)
            state, note = TrialState.COMPLETE, f"{metric} {results[metric]:.4g}"
        else:
            where = workdir_lib.CV_RESULTS if worker.sweep.folds else workdir_lib.RESULTS
            worker.fatal = (f"{worker.sweep.path}: metric {metric!r} is not in {trial.workdir}/{where}; "
                            f"use one of {', '.join(sorted(results))}")
    elif code == trial_lib.PRUNED_EXIT:
        state = TrialState.PRUNED
    elif stopping or code in trial_lib.STOPPED_EXITS:
        trial_lib.release(trial)
        log(f"sweep: trial {number} stopped after {took} and stays RUNNING, its checkpoint saved; run the sweep "
            "again to resume it")
        return "RUNNING"
    worker.teller.tell(number, results[metric] if state == TrialState.COMPLETE else None, state=state)
    trial_lib.release(trial)
    trials = worker.study.get_trials(deepcopy=False)
    if state == TrialState.PRUNED:
        steps = trials[number].intermediate_values
        note = f"at epoch {max(steps)}, {metric} {steps[max(steps)]:.4g}" if steps else "before its first epoch"
    done = sum(t.state.is_finished() for t in trials)
    log(f"sweep [{done}/{worker.n_trials}] trial {number} {state.name} ({note}) after {took}")
    if state == TrialState.FAIL:
        worker.failures += 1
        log(f"    end of {os.path.join(trial.workdir, 'log.txt')}:\n    " +
            trial_lib.log_tail(trial.workdir).replace("\n", "\n    "))
    return state.name


def run_trials(worker: Worker, log: Callable[[str], None] = print,
               on_change: Callable[[], None] = lambda: None) -> int | None:
    """Runs trials, --workers at a time, until the study is full; returns the stopping signal, if one came.

    SIGINT or SIGTERM is passed on to the trials as SIGTERM (each saves a
    checkpoint and stays RUNNING); a second one kills them.
    """
    running: list[trial_lib.Running] = []
    signals: list[int] = []  # the handler only records: the loop forwards, and claims nothing more
    previous = {s: signal.signal(s, lambda signum, _: signals.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    forwarded, wanted, launched = 0, True, 0
    try:
        while True:
            while wanted and not signals and worker.fatal is None and len(running) < worker.workers:
                trial = claim(worker)
                if trial is None:
                    wanted = False  # until one of ours ends: then the study may have room, or an orphan
                    break
                _launch(worker, trial, log)
                running.append(trial)
                launched += 1
            if not running:
                break
            if len(signals) > forwarded:
                forwarded = len(signals)
                for trial in running:
                    trial.proc.send_signal(signal.SIGTERM if forwarded == 1 else signal.SIGKILL)
            time.sleep(0.2)
            for trial in [r for r in running if r.proc.poll() is not None]:
                running.remove(trial)
                finish(worker, trial, bool(signals), log)
                on_change()
                wanted = True
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not launched and worker.fatal is None:
        trials = worker.study.get_trials(deepcopy=False)
        elsewhere = sum(t.state == TrialState.RUNNING for t in trials)
        log(f"sweep: no trial to run here: the study has {len(trials)} of {worker.n_trials} trials"
            + (f", {elsewhere} running in other workers (or left by a worker on another machine)" if elsewhere else ""))
    return signals[0] if signals else None
