"""The evaluator: a split's loss and accuracy, and the per-class metrics of the same predictions.

The compiled eval step (cnn/train/steps.py: eval_step) sums loss and correct
predictions on the devices, and returns each example's class probabilities
and predicted class; these are gathered on the host (evaluation is not the hot
path) and scored with scikit-learn, so the metrics are scikit-learn's own on
the very predictions `test_accuracy` counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cnn import data as data_lib
from cnn import sharding

# The scalar metrics an epoch record and results.json hold besides test_loss and test_accuracy (TensorBoard: test/*);
# `per_class` holds {class name: {precision, recall, f1, support}}.
SCALARS = ("macro_f1", "balanced_accuracy", "top5_accuracy", "roc_auc", "average_precision")
METRICS = ("per_class", *SCALARS)
_SUMS = ("loss", "correct", "count")


class Predictions(NamedTuple):
    """A split's real examples, in order: true labels, predicted classes and class probabilities (N, classes)."""

    labels: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray


def evaluate(state, split: data_lib.Split, batch_size: int, eval_fn: Callable, batch_sharding,
             class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """{'loss', 'accuracy', 'metrics'} over every example of `split`, in padded batches of one shape; 'metrics' is
    `class_metrics` of the same predictions (classes named by index when `class_names` is None)."""
    sums, predictions = predict(state, split, batch_size, eval_fn, batch_sharding)
    if class_names is None:
        class_names = [str(i) for i in range(predictions.probabilities.shape[-1])]
    return {"loss": float(sums["loss"] / sums["count"]), "accuracy": float(sums["correct"] / sums["count"]),
            "metrics": class_metrics(predictions, class_names)}


def predict(state, split: data_lib.Split, batch_size: int, eval_fn: Callable, batch_sharding
            ) -> tuple[dict[str, np.ndarray], Predictions]:
    """The eval step's sums over `split` (added on the devices, batch by batch) and its per-example `Predictions`.

    The step's outputs are replicated, so every process holds the whole
    batch's predictions in the global batch's order, and fetches them once
    at the end.
    """
    index, mask = data_lib.eval_index(len(split), batch_size)
    totals, outputs = None, []
    for i in range(len(index)):
        out = eval_fn(state, sharding.put_batch(data_lib.host_batch(split, index[i], mask[i]), batch_sharding))
        sums = {key: out[key] for key in _SUMS}
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
        outputs.append((out["predicted"], out["probabilities"]))
    totals, outputs = sharding.to_host((totals, outputs))
    real = mask.ravel()
    predictions = Predictions(labels=np.asarray(split.labels)[index.ravel()[real]],
                              predicted=np.concatenate([p for p, _ in outputs])[real],
                              probabilities=np.concatenate([q for _, q in outputs])[real])
    return totals, predictions


def class_metrics(predictions: Predictions, class_names: Sequence[str]) -> dict[str, Any]:
    """The metrics scikit-learn gives for `predictions` (zero_division=0): `per_class`, `macro_f1`,
    `balanced_accuracy`; `top5_accuracy` with more than five classes; `roc_auc` and `average_precision` of class 1's
    probability with two (None where the split holds one class only, so neither is defined).

    Counted from the confusion matrix with NumPy, as scikit-learn defines them (tests/test_evaluation.py compares
    the two): importing sklearn.metrics takes a second, which fell inside the first epoch's evaluation and so in
    every run's time to its first accuracy. Only the two-class curves' areas import it.
    """
    labels, predicted, probs = predictions
    k = len(class_names)
    confusion = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    hits, support, claimed = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    ratio = lambda a, b: np.divide(a, b, out=np.zeros(k), where=b > 0)
    precision, recall, f1 = ratio(hits, claimed), ratio(hits, support), ratio(2 * hits, support + claimed)
    out: dict[str, Any] = {
        "per_class": {str(name): {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(class_names, precision, recall, f1, support)},
        "macro_f1": float(f1.mean()),
        # Over the classes the split holds: one predicted but absent has no recall to average.
        "balanced_accuracy": float(recall[support > 0].mean()),
    }
    if k > 5:
        top5 = np.argsort(probs, axis=1, kind="mergesort")[:, ::-1][:, :5]
        out["top5_accuracy"] = float((top5 == labels[:, None]).any(1).mean())
    if k == 2:
        from sklearn import metrics

        both = len(np.unique(labels)) == 2
        out["roc_auc"] = float(metrics.roc_auc_score(labels, probs[:, 1])) if both else None
        out["average_precision"] = float(metrics.average_precision_score(labels, probs[:, 1])) if both else None
    return out


def per_class_table(per_class: dict[str, dict], limit: int = 30) -> str:
    """The per-class metrics as a text table, one row per class; beyond `limit` classes, the `limit` of lowest F1
    (the rest are in results.json)."""
    names = list(per_class)
    shown = names if len(names) <= limit else sorted(names, key=lambda n: per_class[n]["f1"])[:limit]
    width = max(5, *(len(n) for n in shown))
    lines = [f"{'class':<{width}}  precision  recall      f1  support"]
    lines += [f"{name:<{width}}  {m['precision']:>9.4f}  {m['recall']:>6.4f}  {m['f1']:>6.4f}  {m['support']:>7,}"
              for name, m in ((n, per_class[n]) for n in shown)]
    if len(shown) < len(names):
        lines.append(f"({len(shown)} of {len(names)} classes shown, lowest F1 first; all of them in results.json)")
    return "\n".join(lines)
