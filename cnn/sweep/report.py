"""What a sweep leaves in --workdir: results.csv, Optuna's plots as PNG, and the ranked table it prints.

Everything comes from the study, not from trial folders, so a worker on
any machine reports every trial, wherever it ran.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from cnn.sweep.space import Sweep, _short_keys

PLOTS = ("optimization_history", "param_importances", "slice")
_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.WAITING: 3,
          TrialState.FAIL: 4}


def rows(study: optuna.Study, sweep: Sweep) -> list[dict[str, Any]]:
    """One row per trial: number, state, its values, the metric (a pruned trial's last epoch's), workdir, results."""
    out = []
    for t in study.get_trials(deepcopy=False):
        results = {k: v for k, v in t.user_attrs.get("results", {}).items() if k != sweep.metric}
        steps = t.intermediate_values
        out.append({"number": t.number, "state": t.state.name, **{k: t.params.get(k, "") for k in sweep.space},
                    sweep.metric: "" if t.value is None else t.value,
                    "last_epoch": max(steps) if steps else "", "workdir": t.user_attrs.get("workdir", ""),
                    **results})
    return out


def write_csv(table: list[dict[str, Any]], path: str) -> None:
    columns = list(dict.fromkeys(k for row in table for k in row))
    temporary = f"{path}.{os.getpid()}.tmp"  # workers sharing --workdir each write whole files
    with open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(table)
    os.replace(temporary, path)


def ranked(table: list[dict[str, Any]], sweep: Sweep) -> list[dict[str, Any]]:
    """Finished trials best first, pruned ones by their last value, then running and failed ones."""
    def key(row):
        value = row[sweep.metric]
        number = float(value) if value != "" else math.nan
        sign = -1 if sweep.goal == "max" else 1
        return (_ORDER[TrialState[row["state"]]], math.isnan(number), sign * number if number == number else 0)

    return sorted(table, key=key)


def format_table(table: list[dict[str, Any]], sweep: Sweep) -> str:
    """The ranked table a worker prints at the end."""
    short = _short_keys(list(sweep.space))
    header = ["rank", "trial", "state", sweep.metric, "epoch", *short.values(), "folder"]
    lines = []
    for i, row in enumerate(ranked(table, sweep), 1):
        value = row[sweep.metric]
        lines.append([str(i), str(row["number"]), row["state"], f"{value:.4g}" if value != "" else "-",
                      str(row["last_epoch"]), *(_shown(row[k]) for k in short),
                      os.path.basename(row["workdir"])])
    widths = [max(len(c) for c in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *lines])


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_plots(study: optuna.Study, workdir: str) -> tuple[list[str], list[str]]:
    """Optuna's optimization history, parameter importances and slice plot as PNG; returns (paths, reasons skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as plots

    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return [], ["no trial has completed yet"]
    paths, skipped = [], []
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
                axes = getattr(plots, f"plot_{name}")(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances need two finished trials
            skipped.append(f"{name}: {str(e).splitlines()[0]}")
            continue
        figure = np.ravel(axes)[0].figure
        path = os.path.join(workdir, f"{name}.png")
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)
    return paths, skipped
