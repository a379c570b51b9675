"""Sweeps: one base config, many sets of overrides, each trial its own `cnn.main` run.

    python -m cnn.sweep experiments/digits_lr.py --workdir=runs/digits_lr [--parallel=2] [--dry_run]

A sweep file (see experiments/) has `get_sweep()` returning a dict:

    config   the base config file, relative to the working directory, the sweep file or its parent
    trials   a list of override dicts, one per trial, e.g. from product(), zipped() and sample() below
    fixed    overrides every trial gets (optional), e.g. {"train.num_epochs": 2}
    metric   a key of results.json to rank and plot by (optional, default test_accuracy)
    goal     'max' or 'min' (optional; 'min' for losses, errors and times)

Each trial runs as a separate process in `WORKDIR/<its overrides>/`, so a crash, a
NaN or an out-of-memory in one trial cannot take the others down, and the
folder is exactly what `cnn.main` would write by hand. A trial whose folder
holds results.json is finished; any other is run again, and `cnn.main` resumes
it from its own checkpoints, so a killed sweep continues where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import json
import math
import numbers
import os
import random as random_lib
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from cnn import workdir as workdir_lib
from cnn.config import check_fields, load_config
from cnn.errors import ConfigError
from cnn.progress import format_seconds

Overrides = dict[str, Any]

# ---------------------------------------------------------------------------
# Building trial lists. A trial list is a plain list of override dicts, so
# lists from these helpers can be added together or written out by hand.


def _axes(part: Mapping[str, Sequence] | Iterable[Overrides]) -> list[Overrides]:
    """A dict of value lists becomes the grid of its axes; a list of dicts stays as it is."""
    if isinstance(part, Mapping):
        trials: list[Overrides] = [{}]
        for key, values in part.items():
            if not isinstance(values, (list, tuple, range)) or not len(values):
                raise ConfigError(f"sweep axis {key!r}={values!r} is not a non-empty list of values; "
                                  f"write {key!r}: [{values!r}] (a tuple-valued field needs a list of tuples)")
            trials = [{**t, key: v} for t in trials for v in values]
        return trials
    trials = list(part)
    if not all(isinstance(t, Mapping) for t in trials):
        raise ConfigError(f"sweep trials {trials!r} are not dicts of overrides")
    return [dict(t) for t in trials]


def product(*parts: Mapping[str, Sequence] | Iterable[Overrides]) -> list[Overrides]:
    """Every combination of the parts' trials.

    A part is a dict of value lists (itself a grid) or a list of trials, e.g.
    `product({"optimizer.learning_rate": [0.01, 0.1], "train.batch_size": [32, 128]})` gives 4 trials and
    `product(zipped({...}), {"seed": [0, 1]})` repeats each zipped trial for two seeds.
    """
    trials: list[Overrides] = [{}]
    for part in parts:
        rows = _axes(part)
        for row in rows:
            clash = [k for k in row if any(k in t for t in trials)]
            if clash:
                raise ConfigError(f"sweep key {clash[0]!r} appears in two parts of product(); give each key once")
        trials = [{**t, **row} for t in trials for row in rows]
    return trials


def zipped(axes: Mapping[str, Sequence]) -> list[Overrides]:
    """The i-th value of every list together: trials that vary several fields in step."""
    lengths = {key: len(values) for key, values in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"zipped() needs lists of one length; got {lengths}")
    _axes(axes)  # the same checks on each list
    return [dict(zip(axes, values)) for values in zip(*axes.values())]


Distribution = Callable[[random_lib.Random], Any]


def uniform(low: float, high: float) -> Distribution:
    """For sample(): a number drawn evenly from [low, high]."""
    return lambda rng: _round(rng.uniform(low, high))


def log_uniform(low: float, high: float) -> Distribution:
    """For sample(): a positive number whose logarithm is even in [log low, log high], as learning rates want."""
    if not 0 < low < high:
        raise ConfigError(f"log_uniform({low}, {high}) needs 0 < low < high")
    return lambda rng: _round(math.exp(rng.uniform(math.log(low), math.log(high))))


def _round(x: float) -> float:
    """Three significant digits: as good for a sweep, and the folder names stay readable."""
    return float(f"{x:.3g}")


def sample(n: int, space: Mapping[str, Sequence | Distribution], seed: int = 0) -> list[Overrides]:
    """`n` distinct random trials (random search); the same seed gives the same trials.

    Each value in `space` is a list to choose from or a distribution such as
    `log_uniform(1e-4, 1e-1)`.
    """
    rng = random_lib.Random(seed)
    trials: list[Overrides] = []
    for _ in range(100 * n):
        if len(trials) == n:
            break
        trial = {k: (d(rng) if callable(d) else rng.choice(list(d))) for k, d in space.items()}
        if trial not in trials:
            trials.append(trial)
    return trials


# ---------------------------------------------------------------------------
# Loading a sweep file and turning it into trials.


@dataclasses.dataclass
class Trial:
    name: str  # the folder name, from the overrides
    overrides: Overrides  # swept values only
    workdir: str
    command: list[str]


@dataclasses.dataclass
class Sweep:
    path: str
    config: str  # absolute path of the base config
    config_name: str  # as the sweep file names it: the same wherever the checkout lives
    trials: list[Overrides]
    fixed: Overrides
    metric: str
    goal: str

    @property
    def keys(self) -> list[str]:
        """The swept keys, in the order the sweep file first names them."""
        return list(dict.fromkeys(k for t in self.trials for k in t))


def default_goal(metric: str) -> str:
    return "min" if any(w in metric for w in ("loss", "error", "seconds", "time")) else "max"


def _find_config(path: str, sweep_path: str) -> str:
    here = os.path.dirname(os.path.abspath(sweep_path))
    for base in (os.getcwd(), here, os.path.dirname(here)):
        candidate = os.path.join(base, path)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise ConfigError(f"{sweep_path}: config {path!r} was not found from the working directory, the sweep file "
                      "or its parent folder; name a file such as 'configs/mnist.py'")


def load_sweep(path: str, metric: str | None = None) -> Sweep:
    """Reads a sweep file and checks it against its base config, before anything runs."""
    if not os.path.isfile(path):
        raise ConfigError(f"sweep file {path!r} does not exist; pass a file such as experiments/digits_lr.py")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_sweep", None)):
        raise ConfigError(f"sweep file {path!r} has no get_sweep() function; see experiments/digits_lr.py")
    spec_dict = module.get_sweep()
    if not isinstance(spec_dict, Mapping) or "config" not in spec_dict or "trials" not in spec_dict:
        raise ConfigError(f"{path}: get_sweep() must return a dict with 'config' and 'trials' (and optionally "
                          "'fixed', 'metric', 'goal')")
    unknown = set(spec_dict) - {"config", "trials", "fixed", "metric", "goal"}
    if unknown:
        raise ConfigError(f"{path}: get_sweep() returned unknown entries {sorted(unknown)}; "
                          "expected config, trials, fixed, metric, goal")
    trials = _axes(spec_dict["trials"])
    if not trials:
        raise ConfigError(f"{path}: the sweep has no trials")
    fixed = dict(spec_dict.get("fixed", {}))
    both = sorted({k for t in trials for k in t} & set(fixed))
    if both:
        raise ConfigError(f"{path}: {both[0]!r} is both fixed and swept; keep it in one of them")
    config_path = _find_config(spec_dict["config"], path)
    config = load_config(config_path)
    check_fields(config, [*fixed, *dict.fromkeys(k for t in trials for k in t)], path)
    metric = metric or spec_dict.get("metric", "test_accuracy")
    goal = spec_dict.get("goal") if metric == spec_dict.get("metric") and "goal" in spec_dict else default_goal(
        metric)
    if goal not in ("max", "min"):
        raise ConfigError(f"{path}: goal={goal!r} is not valid: expected 'max' or 'min'")
    return Sweep(os.path.abspath(path), config_path, spec_dict["config"], trials, fixed, metric, goal)


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """'optimizer.learning_rate' -> 'learning_rate', unless two keys would then read the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else repr(tuple(value) if isinstance(value, list) else value)


def trial_name(overrides: Overrides) -> str:
    """A readable folder name that depends only on this trial's overrides, so it survives edits to the sweep."""
    if not overrides:
        return "base"
    short = _short_keys(list(overrides))
    name = ",".join(f"{short[k]}={_value_text(v)}" for k, v in overrides.items())
    clean = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)).strip("._")
    if clean != name or len(clean) > 100:  # lossy: keep two different trials apart
        digest = hashlib.sha1(repr(sorted(overrides.items())).encode()).hexdigest()[:8]
        clean = f"{clean[:90]}-{digest}"
    return clean


def make_trials(sweep: Sweep, workdir: str, extra: Sequence[str] = ()) -> list[Trial]:
    """One `cnn.main` command per trial; `extra` are `--config.x=y` flags from the sweep's own command line."""
    workdir = os.path.abspath(workdir)
    trials, seen = [], {}
    for overrides in sweep.trials:
        name = trial_name(overrides)
        if name in seen:
            raise ConfigError(f"{sweep.path}: trial {name!r} appears twice; remove the repeated values")
        seen[name] = overrides
        trial_dir = os.path.join(workdir, name)
        flags_ = [f"--config.{k}={_value_text(v)}" for k, v in {**sweep.fixed, **overrides}.items()]
        command = [sys.executable, "-m", "cnn.main", f"--config={sweep.config}", f"--workdir={trial_dir}",
                   *flags_, *extra]
        trials.append(Trial(name, overrides, trial_dir, command))
    return trials


# ---------------------------------------------------------------------------
# Running trials, N at a time.


def _identity(trial: Trial, sweep: Sweep) -> dict:
    return {"config": sweep.config_name, "overrides": {k: _value_text(v) for k, v in {**sweep.fixed,
                                                                                 **trial.overrides}.items()}}


def is_done(trial: Trial) -> bool:
    return os.path.isfile(os.path.join(trial.workdir, "results.json"))


def check_resumable(trials: Sequence[Trial], sweep: Sweep) -> None:
    """A finished trial folder from an edited sweep (say, other fixed epochs) would be silently reused: refuse."""
    for trial in trials:
        record = os.path.join(trial.workdir, "trial.json")
        if not os.path.isfile(record):
            continue
        with open(record) as f:
            before = json.load(f)
        now = _identity(trial, sweep)
        if before != now:
            raise ConfigError(f"{trial.workdir} was run with other settings (config {before['config']}, "
                              f"{before['overrides']}; now {now['config']}, {now['overrides']}); "
                              "use a new --workdir or delete that folder")


def _die_with_parent() -> None:
    """Runs in the child before exec: if the sweep dies, even by SIGKILL, the trial gets SIGTERM and checkpoints."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child_env(parallel: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if parallel > 1 and not any(v in env for v in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION")):
        # JAX reserves 75% of a GPU's memory per process; several trials on one GPU must not.
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def _tail(path: str, lines: int = 6) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no log)"


def _start(trial: Trial, sweep: Sweep, env: dict[str, str]) -> subprocess.Popen:
    """Starts the trial's cnn.main in its folder, its output appended to log.txt there."""
    os.makedirs(trial.workdir, exist_ok=True)
    workdir_lib.write_json(os.path.join(trial.workdir, "trial.json"), _identity(trial, sweep))
    with open(os.path.join(trial.workdir, "log.txt"), "a") as logfile:
        logfile.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(trial.command)}\n")
        logfile.flush()
        return subprocess.Popen(trial.command, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def run_trials(trials: Sequence[Trial], sweep: Sweep, parallel: int, log: Callable[[str], None] = print
               ) -> tuple[dict[str, str], int | None]:
    """Runs the unfinished trials, `parallel` at a time; returns each trial's status and the stopping signal.

    Status: 'done', 'failed' (and why), or 'stopped' when the sweep was
    interrupted. SIGINT or SIGTERM to the sweep is passed on to the trials as
    SIGTERM, so each saves a checkpoint; a second one kills them.
    """
    status = {t.name: "done" for t in trials if is_done(t)}
    pending = [t for t in trials if t.name not in status]
    log(f"sweep: {len(trials)} trials, {len(status)} already done, {len(pending)} to run, {parallel} at a time, "
        f"in {os.path.dirname(trials[0].workdir)}")
    running: dict[subprocess.Popen, tuple[Trial, float]] = {}
    signals: list[int] = []  # the handler only records; the loop forwards, so a child started meanwhile is included
    previous = {s: signal.signal(s, lambda signum, _: signals.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    start, durations, forwarded = time.time(), [], 0
    env = _child_env(parallel)
    try:
        while pending or running:
            while pending and len(running) < parallel and not signals:
                trial = pending.pop(0)
                running[_start(trial, sweep, env)] = (trial, time.time())
            if signals and not running:
                break
            if len(signals) > forwarded:
                forwarded = len(signals)
                for proc in running:
                    proc.send_signal(signal.SIGTERM if forwarded == 1 else signal.SIGKILL)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                trial, began = running.pop(proc)
                seconds = time.time() - began
                if proc.returncode == 0 and is_done(trial):
                    status[trial.name] = "done"
                    value = read_results(trial).get(sweep.metric)
                    shown = f"{sweep.metric} {value:.4g}" if isinstance(value, numbers.Real) else "no " + sweep.metric
                    elapsed = time.time() - start
                    # Each trial still to finish takes about the mean so far, `parallel` of them at a time.
                    durations.append(seconds)
                    left = sum(durations) / len(durations) * (len(pending) + len(running)) / parallel
                    log(f"sweep [{len(status)}/{len(trials)}] done {trial.name}: {shown} in {format_seconds(seconds)};"
                        f" {format_seconds(elapsed)} elapsed, ~{format_seconds(left)} left")
                elif signals:
                    status[trial.name] = "stopped"
                else:
                    status[trial.name] = f"failed (exit {proc.returncode})"
                    logfile = os.path.join(trial.workdir, "log.txt")
                    log(f"sweep [{len(status)}/{len(trials)}] FAILED {trial.name} (exit {proc.returncode}); end of "
                        f"{logfile}:\n    " + _tail(logfile).replace("\n", "\n    "))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for trial in pending:
        status.setdefault(trial.name, "not run")
    if signals:
        stopped = sum(s == "stopped" for s in status.values())
        log(f"sweep: interrupted; {stopped} running trial(s) stopped and kept their checkpoints, {len(pending)} not "
            "started; run the same command to resume")
    return status, (signals[0] if signals else None)


# ---------------------------------------------------------------------------
# Collecting results: results.csv, sweep.png and the ranked table.


def read_results(trial: Trial) -> dict[str, Any]:
    return workdir_lib.read_json(os.path.join(trial.workdir, "results.json")) or {}


def collect(trials: Sequence[Trial], sweep: Sweep, status: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per trial: name, status, the swept values, then every number in its results.json."""
    rows = []
    for trial in trials:
        results = {k: v for k, v in read_results(trial).items() if isinstance(v, (numbers.Real, str))}
        rows.append({"trial": trial.name, "status": status.get(trial.name, "not run"),
                     **{k: trial.overrides.get(k, "") for k in sweep.keys}, **results})
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with workdir_lib.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _value_text(v) if isinstance(v, (tuple, list)) else v for k, v in row.items()})


def _number(value: Any) -> float:
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan


def ranked(rows: Sequence[Mapping[str, Any]], metric: str, goal: str) -> list[Mapping[str, Any]]:
    """Best first; trials without the metric (failed, not run) last."""
    def key(row):
        value = _number(row.get(metric))
        return (math.isnan(value), -value if goal == "max" else value)

    return sorted(rows, key=key)


def format_table(rows: Sequence[Mapping[str, Any]], sweep: Sweep) -> str:
    """The ranked table printed at the end of a sweep."""
    short = _short_keys(sweep.keys)
    metrics = list(dict.fromkeys([sweep.metric, "test_accuracy", "test_loss", "train_seconds"]))
    header = ["rank", *metrics, *short.values(), "status"]
    lines = []
    for i, row in enumerate(ranked(rows, sweep.metric, sweep.goal), 1):
        values = [_number(row.get(m)) for m in metrics]
        lines.append([str(i), *("-" if math.isnan(v) else f"{v:.4g}" for v in values),
                      *(_value_text(row.get(k, "")) for k in short), str(row["status"])])
    widths = [max(len(c) for c in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(c.rjust(w) if j < len(header) - 1 else c for j, (c, w) in enumerate(zip(r, widths)))
                     for r in [header, *lines])


def _is_numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)


def plot(rows: Sequence[Mapping[str, Any]], sweep: Sweep, path: str) -> None:
    """The metric against each swept value: one panel per key, one line per setting of the other keys."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    keys = sweep.keys
    short = _short_keys(keys)
    fig = Figure(figsize=(4.8 * len(keys), 3.8), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    good = [r for r in rows if not math.isnan(_number(r.get(sweep.metric)))]
    for ax, key in zip(axes, keys):
        values = [r.get(key, "") for r in rows if key in r and r.get(key, "") != ""]
        distinct = list(dict.fromkeys(values))
        numeric = _is_numeric(distinct)
        if numeric:
            distinct.sort()
            position = {v: v for v in distinct}
            if min(distinct) > 0 and max(distinct) / min(distinct) >= 8:
                ax.set_xscale("log", base=2 if all(float(v).is_integer() for v in distinct) else 10)
        else:  # names, tuples, booleans: evenly spaced, labelled
            position = {v: i for i, v in enumerate(distinct)}
        others = [k for k in keys if k != key]
        groups: dict[tuple, list] = {}
        for row in good:
            if row.get(key, "") != "":
                groups.setdefault(tuple(_value_text(row.get(k, "")) for k in others), []).append(row)
        if len(groups) <= 8:  # few enough lines to tell apart: how the key acts at each setting of the others
            for label, members in groups.items():
                members.sort(key=lambda r: position[r[key]])
                ax.plot([position[r[key]] for r in members], [_number(r[sweep.metric]) for r in members],
                        "o-" if numeric else "o",  # a line between names would suggest an order they lack
                        label=", ".join(f"{short[k]}={v}" for k, v in zip(others, label)))
            if len(groups) > 1:
                ax.legend(fontsize="small")
        else:
            points = [(position[r[key]], _number(r[sweep.metric])) for r in good if r.get(key, "") != ""]
            ax.plot([p[0] for p in points], [p[1] for p in points], "o", alpha=0.7)
        if len(distinct) <= 10:
            ax.set_xticks([position[v] for v in distinct])
            ax.set_xticklabels([_value_text(v)[:24] for v in distinct], rotation=0 if numeric else 20,
                               ha="center" if numeric else "right")
            ax.minorticks_off()
        ax.set_xlabel(key)
        ax.set_ylabel(sweep.metric)
        ax.grid(True, alpha=0.3)
    best = ranked(good, sweep.metric, sweep.goal)[:1]
    title = os.path.basename(sweep.path)
    if best:
        title += f": best {sweep.metric} {_number(best[0][sweep.metric]):.4g} at {best[0]['trial']}"
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------
# The command line.


def main(argv: Sequence[str] | None = None) -> int:
    """Runs (or, with --dry_run, prints) a sweep; returns the exit status."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m cnn.sweep", description="Run every trial of a sweep file as its own cnn.main run.",
        epilog="Extra --config.FIELD=VALUE flags go to every trial, e.g. --config.data.manual_dir=DIR.")
    parser.add_argument("sweep_file", help="a file with get_sweep(), such as experiments/digits_lr.py")
    parser.add_argument("--workdir", required=True, help="folder for the trials, results.csv and sweep.png")
    parser.add_argument("--parallel", type=int, default=1, help="trials to run at once (default 1)")
    parser.add_argument("--dry_run", action="store_true", help="print one shell command per trial and run nothing")
    parser.add_argument("--metric", help="results.json key to rank and plot by (default: the sweep file's)")
    args, rest = parser.parse_known_args(argv)
    extra = [a for a in rest if a.startswith("--config.") and "=" in a]
    if len(extra) != len(rest):
        parser.error(f"unexpected arguments: {' '.join(a for a in rest if a not in extra)}")
    if args.parallel < 1:
        parser.error(f"--parallel={args.parallel} is not valid: expected a positive integer")
    try:
        sweep = load_sweep(args.sweep_file, args.metric)
        check_fields(load_config(sweep.config), [a[len("--config."):].split("=", 1)[0] for a in extra], "command line")
        trials = make_trials(sweep, args.workdir, extra)
        if args.dry_run:
            for trial in trials:
                print(shlex.join(trial.command))
            return 0
        workdir_lib.check_writable(args.workdir, "--workdir")
        check_resumable(trials, sweep)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    status, stopped_by = run_trials(trials, sweep, args.parallel)
    rows = collect(trials, sweep, status)
    csv_path, png_path = os.path.join(args.workdir, "results.csv"), os.path.join(args.workdir, "sweep.png")
    write_csv(rows, csv_path)
    if not any(not math.isnan(_number(r.get(sweep.metric))) for r in rows) and any(s == "done" for s in
                                                                                     status.values()):
        known = sorted({k for r in rows for k, v in r.items() if isinstance(v, numbers.Real)} - set(sweep.keys))
        print(f"error: metric {sweep.metric!r} is in no results.json; pass --metric as one of {', '.join(known)}",
              file=sys.stderr)
        return 2
    print(format_table(rows, sweep))
    if sweep.keys:
        plot(rows, sweep, png_path)
    counts = {s: sum(v.split(" ")[0] == s for v in status.values()) for s in ("done", "failed", "stopped")}
    print(f"sweep: {counts['done']} done, {counts['failed']} failed, {counts['stopped']} stopped; "
          f"results in {csv_path}, plot in {png_path}")
    if stopped_by is not None:
        return 128 + stopped_by  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
