"""Stratified k-fold cross-validation: one run per fold in WORKDIR/fold_K, then their mean and spread.

    summary = cnn.cross_validate(config, "runs/digits_cv", folds=5)
    summary["mean"]["test_accuracy"], summary["std"]["test_accuracy"]

The folds split the dataset's training split (scikit-learn's
StratifiedKFold, shuffled by config.seed); each fold's run trains on the
other folds and evaluates on its own, which takes the place of the test
split: its `test_*` figures are the validation fold's. The dataset's own
test split is left unused, kept for the final model. Each fold is an
ordinary run in its own workdir, so a rerun resumes an interrupted fold and
finds the finished ones done.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from cnn import config as config_lib
from cnn import data as data_lib
from cnn import workdir as workdir_lib
from cnn.errors import ConfigError
from cnn.train.loop import TrainResult, train_and_evaluate
from cnn.train.monitor import check_recorded


def fold_indices(labels: np.ndarray, folds: int, seed: int, class_names: list[str] | None = None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training, validation) indices of each fold: every example in exactly one validation fold, each class
    spread over the folds in proportion. Refuses fewer than two folds, or more than the smallest class has
    examples (a fold would miss that class)."""
    from sklearn.model_selection import StratifiedKFold

    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ConfigError(f"--folds={folds!r}: cross-validation needs at least 2 folds (5 or 10 are usual)")
    values, counts = np.unique(labels, return_counts=True)
    if folds > counts.min():
        smallest = values[counts.argmin()]
        raise ConfigError(f"--folds={folds} is more than the {counts.min()} training examples of class "
                          f"{class_names[smallest] if class_names else smallest!r}, the smallest class, so a fold "
                          "would lack it; use at most "
                          f"--folds={counts.min()}")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=int(seed))
    return list(splitter.split(np.zeros((len(labels), 1)), labels))


def fold_dataset(dataset: data_lib.Dataset, train: np.ndarray, validation: np.ndarray, fold: int,
                 folds: int) -> data_lib.Dataset:
    """The fold's dataset: the training split's `train` rows to train on, its `validation` rows as the test split
    (rows of a streamed split stay on disk)."""
    split = dataset.train
    return data_lib.Dataset(
        f"{dataset.name} fold {fold}/{folds}",
        data_lib.Split(data_lib.stream.select(split.images, train), split.labels[train]),
        data_lib.Split(data_lib.stream.select(split.images, validation), split.labels[validation]),
        dataset.class_names, dataset.skipped)


def cross_validate(config: ml_collections.ConfigDict, workdir: str, folds: int,
                   dataset: data_lib.Dataset | None = None, model: Any = None,
                   on_fold_end: Callable[[str, TrainResult], None] | None = None) -> dict[str, Any]:
    """Trains one run per fold in WORKDIR/fold_1 ... fold_K and writes WORKDIR/cv_results.json: each fold's
    figures (the numbers of its results.json), and their mean and standard deviation. Returns that summary.

    `dataset` and `model` are as for train_and_evaluate; `on_fold_end(fold_workdir, run)` runs after each fold
    (the command line draws its pictures there). A fold already finished is read back, not trained again.
    """
    config_lib.validate(config)
    dataset = data_lib.load_dataset(config.data, config.seed) if dataset is None else \
        data_lib.conform(dataset, config.data)
    check_recorded(config.train, dataset.num_classes)
    splits = fold_indices(np.asarray(dataset.train.labels), folds, config.seed, dataset.class_names)
    path, monitor = os.path.join(workdir, workdir_lib.CV_RESULTS), config.train.get("monitor", "test_accuracy")
    _check_same_folds(path, folds, config.seed)
    rows = []
    workdir_lib.check_writable(workdir)
    workdir_lib.write_json(path, summarize(rows, folds, config))  # names K and the seed before fold_1 starts
    for fold, (train, validation) in enumerate(splits, 1):
        where = os.path.join(workdir, f"fold_{fold}")
        print(f"fold {fold}/{folds}: training on {len(train)}, validating on {len(validation)} examples in {where}",
              flush=True)
        run = train_and_evaluate(config, where, dataset=fold_dataset(dataset, train, validation, fold, folds),
                                 model=model)
        if on_fold_end is not None:
            on_fold_end(where, run)
        rows.append({"fold": fold, "workdir": where, "train_examples": len(train),
                     "validation_examples": len(validation), **_numbers(run.results)})
        print(f"fold {fold}/{folds}: {_line(rows[-1], monitor)}", flush=True)
        summary = summarize(rows, folds, config)  # after each fold: the figures so far
        workdir_lib.write_json(path, summary)
    print(f"cross-validation, {folds} folds: {_line(summary, monitor)}; in {path}", flush=True)
    return summary


def _check_same_folds(path: str, folds: int, seed: int) -> None:
    """Refuses fold folders made for other folds: with another K or seed, fold_1 held other examples."""
    before = workdir_lib.read_json(path)
    if isinstance(before, dict) and (before.get("folds"), before.get("seed")) != (folds, seed):
        raise ConfigError(f"{path} is a cross-validation with --folds={before.get('folds')} and seed="
                          f"{before.get('seed')}, not --folds={folds} and seed={seed}, so its fold folders hold "
                          f"other examples; rerun with those, or pass a new --workdir")


def _numbers(results: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def summarize(rows: list[dict[str, Any]], folds: int, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """cv_results.json: the finished folds' rows, and the mean and (population) standard deviation of every
    number all of them have; `complete` once every fold is in."""
    keys = [k for k in (rows[0] if rows else ()) if k != "fold" and all(isinstance(r.get(k), (int, float)) for r in rows)]
    values = {k: np.array([r[k] for r in rows], np.float64) for k in keys}
    return {"folds": folds, "complete": len(rows) == folds, "seed": config.seed,
            "monitor": config.train.get("monitor", "test_accuracy"),
            "validation": "each fold's test_* figures are its validation fold's; the dataset's test split is unused",
            "mean": {k: float(v.mean()) for k, v in values.items()},
            "std": {k: float(v.std()) for k, v in values.items()},
            "fold_results": rows}


def _line(figures: dict[str, Any], monitor: str) -> str:
    """'test_accuracy 0.9712 ± 0.0050, test_loss ...' for a summary; the values alone for one fold."""
    names = list(dict.fromkeys(["test_accuracy", "test_loss", monitor, f"best_{monitor}"]))
    mean, std = figures.get("mean", figures), figures.get("std", {})
    shown = [f"{n} {mean[n]:.4f}" + (f" ± {std[n]:.4f}" if n in std else "") for n in names
             if isinstance(mean.get(n), (int, float)) and math.isfinite(mean[n])]
    return ", ".join(shown)
