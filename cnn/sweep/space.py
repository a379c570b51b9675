"""A sweep file read and checked before anything runs, and the plumbing from a trial's values to `cnn.main`.

Values reach Optuna as its categorical choices allow (numbers, strings,
booleans, None); a tuple such as a layer list travels as the text that
`--config.model.layers=...` reads, so one text form serves the study, the
command line and the folder names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import ml_collections
from optuna.distributions import BaseDistribution, CategoricalDistribution, distribution_to_json

from cnn import config as config_lib
from cnn.errors import ConfigError
from cnn.sweep import Overrides, _rows

ENTRIES = ("config", "fixed", "metric", "goal", "space", "trials", "n_trials", "startup_trials", "folds")


@dataclasses.dataclass
class Sweep:
    """A sweep file, checked: the study's name, base config, overrides, metric and what is swept."""

    path: str  # the sweep file, absolute
    name: str  # the study's name: the file's name without .py
    config: str  # the base config, absolute
    config_name: str  # as the sweep file writes it: the same on every machine
    base: ml_collections.ConfigDict
    fixed: Overrides  # values as texts
    metric: str
    goal: str  # 'max' or 'min'
    space: dict[str, BaseDistribution]  # every swept key; a trial list's keys as the choices they take
    grid: list[Overrides] | None  # the listed trials (trials=...), None for a space
    n_trials: int | None
    startup_trials: int
    folds: int | None = None  # each trial cross-validates (--folds=K) and is judged by the folds' mean of `metric`

    @property
    def is_grid_space(self) -> bool:
        return all(isinstance(d, CategoricalDistribution) for d in self.space.values())

    def grid_points(self) -> list[Overrides]:
        """Every trial of a grid: the listed ones, or every combination of a space's lists."""
        if self.grid is not None:
            return self.grid
        return _rows({k: list(d.choices) for k, d in self.space.items()})

    def ordered(self, params: Overrides) -> Overrides:
        """A trial's values in the sweep file's key order, whatever order a storage returns them in."""
        return {k: params[k] for k in self.space if k in params}

    def settings(self) -> dict[str, Any]:
        """What the study's results depend on: a worker with other settings must not join it."""
        swept = ({"trials": self.grid} if self.grid is not None else
                 {"space": {k: json.loads(distribution_to_json(d)) for k, d in self.space.items()}})
        return {"config": self.config_name, "fixed": self.fixed, "metric": self.metric, "goal": self.goal,
                "startup_trials": self.startup_trials, "folds": self.folds, **swept}


def text(value: Any) -> Any:
    """A value as Optuna can store it: numbers, strings, booleans and None as they are, others as Python text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(tuple(value) if isinstance(value, list) else value)


def flag(key: str, value: Any) -> str:
    return f"--config.{key}={value if isinstance(value, str) else repr(value)}"


def default_goal(metric: str) -> str:
    return "min" if any(w in metric for w in ("loss", "error", "seconds", "time")) else "max"


def _find_config(path: str, sweep_path: str) -> str:
    here = os.path.dirname(os.path.abspath(sweep_path))
    for base in (os.getcwd(), here, os.path.dirname(here)):
        candidate = os.path.join(base, path)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise ConfigError(f"{sweep_path}: config {path!r} was not found from the working directory, the sweep file "
                      "or its parent folder; name a file such as 'configs/digits.py'")


def _call_get_sweep(path: str) -> Mapping:
    result = config_lib.call_file(path, "get_sweep", "sweep file", "experiments/digits_search.py")
    if not isinstance(result, Mapping) or "config" not in result or ("space" in result) == ("trials" in result):
        raise ConfigError(f"{path}: get_sweep() must return a dict with 'config' and one of 'space' (to search) "
                          "or 'trials' (to run each)")
    unknown = sorted(set(result) - set(ENTRIES))
    if unknown:
        raise ConfigError(f"{path}: get_sweep() returned unknown entries {unknown}; expected {', '.join(ENTRIES)}")
    return result


def _distribution(path: str, key: str, value: Any) -> BaseDistribution:
    if isinstance(value, BaseDistribution):
        return value
    if isinstance(value, (list, tuple, range)) and len(value):
        choices = list(dict.fromkeys(text(v) for v in value))
        return CategoricalDistribution(choices)
    raise ConfigError(f"{path}: space[{key!r}]={value!r} is not a list of values or a range such as "
                      "log_uniform(1e-4, 1e-1), uniform(0, 1) or int_range(1, 8)")


def _count(path: str, name: str, value: Any, least: int) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{path}: {name}={value!r} is not valid: expected an integer >= {least}")
    return value


def load_sweep(path: str) -> Sweep:
    """Reads a sweep file and checks every overridden field against its base config."""
    spec = _call_get_sweep(path)
    if "trials" in spec:
        rows = _rows(spec["trials"])
        if not rows:
            raise ConfigError(f"{path}: the sweep has no trials")
        keys = list(dict.fromkeys(k for t in rows for k in t))
        grid = [{k: text(t[k]) for k in keys if k in t} for t in rows]  # one key order: one name per trial
        names = [trial_name(t) for t in grid]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice:
            raise ConfigError(f"{path}: trial {twice!r} is listed twice; remove the repeated values")
        space = {k: CategoricalDistribution(list(dict.fromkeys(t[k] for t in grid if k in t))) for k in keys}
    else:
        if not isinstance(spec["space"], Mapping) or not spec["space"]:
            raise ConfigError(f"{path}: space={spec['space']!r} is not a dict of fields to values or ranges")
        grid, space = None, {k: _distribution(path, k, v) for k, v in spec["space"].items()}
    fixed = {k: text(v) for k, v in dict(spec.get("fixed") or {}).items()}
    both = sorted(set(fixed) & set(space))
    if both:
        raise ConfigError(f"{path}: {both[0]!r} is both fixed and swept; keep it in one of them")
    config_path = _find_config(spec["config"], path)
    base = config_lib.load_config(config_path)
    config_lib.check_fields(base, [*fixed, *space], f"{path}: override ")
    metric = spec.get("metric", "test_accuracy")
    goal = spec.get("goal", default_goal(metric))
    if goal not in ("max", "min"):
        raise ConfigError(f"{path}: goal={goal!r} is not valid: expected 'max' or 'min'")
    name = os.path.splitext(os.path.basename(path))[0]
    return Sweep(os.path.abspath(path), name, config_path, spec["config"], base, fixed, metric, goal, space, grid,
                 _count(path, "n_trials", spec.get("n_trials"), 1),
                 _count(path, "startup_trials", spec.get("startup_trials", 5), 0), _count(path, "folds",
                                                                                         spec.get("folds"), 2))


def _short_keys(keys: list[str]) -> dict[str, str]:
    """'optimizer.learning_rate' -> 'learning_rate', unless two keys would then read the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def trial_name(overrides: Overrides) -> str:
    """A grid trial's folder: readable, and a function of its values alone, so a SLURM array and the study agree."""
    if not overrides:
        return "base"
    short = _short_keys(list(overrides))
    name = ",".join(f"{short[k]}={v if isinstance(v, str) else repr(v)}" for k, v in overrides.items())
    clean = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)).strip("._")
    if clean != name or len(clean) > 100:  # lossy: keep two different trials apart
        digest = hashlib.sha1(repr(sorted(overrides.items())).encode()).hexdigest()[:8]
        clean = f"{clean[:90]}-{digest}"
    return clean


def trial_dir(sweep: Sweep, workdir: str, number: int, params: Overrides, grid: bool) -> str:
    """Grid trials are named by their values, searched ones by their number (a search may repeat values)."""
    if grid:
        return os.path.join(workdir, trial_name(sweep.ordered(params)))
    return os.path.join(workdir, f"trial_{number:04d}")


def command(sweep: Sweep, workdir: str, params: Overrides, extra: list[str]) -> list[str]:
    """The trial's `cnn.main` command line: fixed overrides, then the trial's values, then --config flags given."""
    values = {**sweep.fixed, **params}
    folds = [f"--folds={sweep.folds}"] if sweep.folds else []
    return [sys.executable, "-m", "cnn.main", f"--config={sweep.config}", f"--workdir={workdir}", *folds,
            *(flag(k, v) for k, v in values.items()), *extra]
