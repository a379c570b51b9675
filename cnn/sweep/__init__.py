"""Sweeps on Optuna: many `cnn.main` runs of one config, as one study.

    python -m cnn.sweep experiments/digits_search.py --workdir=runs/digits_search [--workers=2]

A sweep file (see experiments/) has `get_sweep()` returning a dict:

    config   the base config file, relative to the working directory, the sweep file or its parent
    fixed    overrides every trial gets (optional), e.g. {"train.num_epochs": 3}
    metric   a key of results.json to optimise (optional, default test_accuracy)
    goal     'max' or 'min' (optional; 'min' for losses, errors and times)
    space    a search space: {"optimizer.learning_rate": log_uniform(1e-4, 3e-2), "train.batch_size": [16, 32, 64]}
    trials   or a list of override dicts, each run once, e.g. from product() and zipped() below
    n_trials the study's size when --n_trials is not given (optional; a grid's size by default)
    startup_trials  trials sampled at random and never pruned before TPE and the median pruner act (default 5)
    folds    each trial cross-validates with --folds=K and is judged by the folds' mean of the metric (optional)

A space of lists is a grid (Optuna's GridSampler); with a range in it, TPE
searches it. Each trial runs as its own `cnn.main` process in its own folder
of --workdir, so one crash cannot take the sweep down; the study (a journal
file in --workdir, or --storage) is shared by every worker that joins it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from optuna.distributions import FloatDistribution, IntDistribution

from cnn.errors import ConfigError

Overrides = dict[str, Any]

__all__ = ["int_range", "log_uniform", "product", "uniform", "zipped"]


def _checked(call: str, make: Callable[[], Any]) -> Any:
    """Optuna checks the bounds; the message then names the call in the sweep file."""
    try:
        return make()
    except ValueError as e:
        raise ConfigError(f"{call}: {e}") from None


def uniform(low: float, high: float) -> FloatDistribution:
    """A number anywhere in [low, high], for a search space."""
    return _checked(f"uniform({low!r}, {high!r})", lambda: FloatDistribution(low, high))


def log_uniform(low: float, high: float) -> FloatDistribution:
    """A positive number in [low, high] whose logarithm is evenly drawn, as learning rates want."""
    return _checked(f"log_uniform({low!r}, {high!r})", lambda: FloatDistribution(low, high, log=True))


def int_range(low: int, high: int, step: int = 1, log: bool = False) -> IntDistribution:
    """An integer in [low, high] (both included), every `step`-th, or evenly in log space with `log`."""
    return _checked(f"int_range({low!r}, {high!r}, step={step!r}, log={log!r})",
                    lambda: IntDistribution(low, high, log=log, step=step))


def _rows(part: Mapping[str, Sequence] | Iterable[Overrides]) -> list[Overrides]:
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
    """Every combination of the parts' trials, e.g. `product(zipped({...}), {"seed": [0, 1]})`.

    A part is a dict of value lists (itself a grid) or a list of trials.
    """
    trials: list[Overrides] = [{}]
    for part in parts:
        rows = _rows(part)
        clash = [k for row in rows for k in row if any(k in t for t in trials)]
        if clash:
            raise ConfigError(f"sweep key {clash[0]!r} appears in two parts of product(); give each key once")
        trials = [{**t, **row} for t in trials for row in rows]
    return trials


def zipped(axes: Mapping[str, Sequence]) -> list[Overrides]:
    """The i-th value of every list together: trials that vary several fields in step."""
    lengths = {key: len(values) for key, values in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"zipped() needs lists of one length; got {lengths}")
    _rows(axes)  # the same checks on each list
    return [dict(zip(axes, values)) for values in zip(*axes.values())]
