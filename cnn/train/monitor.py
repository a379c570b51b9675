"""The loop's end-of-epoch decisions by one metric (train.monitor): the best epoch, its kept state, early stopping.

Every decision is a function of the epoch records (metrics.jsonl, which a
resumed run keeps up to its checkpoint), so it needs no state of its own:
a run killed after any epoch and rerun counts its patience on exactly as an
uninterrupted one, and a rerun of a run that stopped early trains no more.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from cnn import workdir as workdir_lib
from cnn.errors import ConfigError
from cnn.train.checkpoint import Checkpoints


def lower_is_better(metric: str) -> bool:
    """Losses fall as a model improves; accuracies, F1, AUC and the like rise."""
    return metric.endswith("loss")


def check_recorded(settings: ml_collections.ConfigDict, num_classes: int) -> None:
    """Refuses, before any work, a train.monitor this run's records will not hold (config.MONITORS says when)."""
    name = settings.get("monitor", "test_accuracy")
    missing = (name == "top5_accuracy" and num_classes <= 5) or \
        (name in ("roc_auc", "average_precision") and num_classes != 2)
    if missing:
        raise ConfigError(f"train.monitor={name!r} is not recorded for {num_classes} classes ({name} needs "
                          f"{'more than five' if name == 'top5_accuracy' else 'two'}); monitor 'test_accuracy', "
                          "'test_loss' or 'macro_f1'")


class Monitor:
    """The best epoch by `train.monitor`, a copy of its state (train.keep_best) and the early stop
    (train.early_stopping_patience) of one run; `history` is always the run's epoch records so far."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        settings = config.train
        self.name = settings.get("monitor", "test_accuracy")
        self.patience = settings.get("early_stopping_patience", 0)
        self.num_epochs = settings.num_epochs
        self.lower = lower_is_better(self.name)
        # Every process of a run opens it: an orbax save is collective, as the newest checkpoints' are.
        self.kept = Checkpoints(workdir, keep=1, owner=True, folder=workdir_lib.BEST) \
            if settings.get("keep_best", False) else None

    def check(self, record: dict) -> None:
        """Refuses a record without the monitored metric (before it is written: nothing of the epoch is saved)."""
        value = record.get(self.name, "")  # None is recorded where a metric is undefined (roc_auc of one class)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            numeric = sorted(k for k, v in record.items() if isinstance(v, float))
            raise ConfigError(f"train.monitor={self.name!r} is not in this run's epoch records (they hold "
                              f"{', '.join(numeric)}); monitor one of those, in a new --workdir")

    def best(self, history: list[dict]) -> dict | None:
        """The record of the best epoch so far (the first of equal ones; NaN never counts), or None."""
        best = None
        for record in history:
            value = record.get(self.name)
            if value is None or not math.isfinite(value):
                continue
            if best is None or (value < best[self.name] if self.lower else value > best[self.name]):
                best = record
        return best

    def should_stop(self, history: list[dict]) -> bool:
        """Whether the run ends after its last recorded epoch: `patience` epochs without an improvement, before
        the last epoch (a run that reaches num_epochs ends there anyway, and did not stop early)."""
        if not self.patience or not history or history[-1]["epoch"] >= self.num_epochs:
            return False
        best = self.best(history)
        return history[-1]["epoch"] - (best["epoch"] if best else 0) >= self.patience

    def keep(self, state: Any, sums: Any, history: list[dict]) -> None:
        """Saves `state` as the best one if the last epoch recorded is the best (train.keep_best)."""
        if self.kept is not None and history and self.best(history) is history[-1]:
            self.kept.save(state, sums)

    def best_state(self, state: Any) -> Any:
        """The kept best epoch's state (`state` gives its structure), or `state` without train.keep_best."""
        restored = self.kept.restore(state) if self.kept is not None else None
        return restored[0] if restored else state

    def results(self, history: list[dict]) -> dict[str, Any]:
        """For results.json: the monitor, the best epoch and its value, and whether the run stopped early."""
        best = self.best(history) or {}
        return {"monitor": self.name, "best_epoch": best.get("epoch"), f"best_{self.name}": best.get(self.name),
                "stopped_early": bool(history) and history[-1]["epoch"] < self.num_epochs,
                "best_checkpoint": self.kept is not None}

    def close(self) -> None:
        if self.kept is not None:
            self.kept.close()
