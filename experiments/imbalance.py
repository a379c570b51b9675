"""Class weights on an imbalanced set: the 8x8 digits with one class cut to 5% of its training examples.

Trains configs/digits.py on that set without class weights and with
train.class_weights='balanced', for a few seeds, and prints the cut class's
recall on the (untouched) test split, scikit-learn's recall_score on the
test predictions, and the overall test accuracy. A few minutes on two cores.

    python experiments/imbalance.py                     # class 8, 5%, seeds 0-4
    python experiments/imbalance.py --cut_class 3 --seeds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cnn  # noqa: E402
from cnn import data as data_lib  # noqa: E402
from cnn import train  # noqa: E402


def cut(dataset: data_lib.Dataset, label: int, fraction: float, seed: int) -> data_lib.Dataset:
    """`dataset` with only `fraction` of class `label`'s training examples (at least one), drawn from `seed`."""
    labels = dataset.train.labels
    members = np.flatnonzero(labels == label)
    kept = np.random.default_rng(seed).choice(members, max(1, round(fraction * len(members))), replace=False)
    index = np.sort(np.concatenate([np.flatnonzero(labels != label), kept]))
    return dataclasses.replace(dataset, train=data_lib.Split(dataset.train.images[index], labels[index]))


def recall_and_accuracy(run, label: int) -> tuple[float, float]:
    """The class's recall and the overall accuracy of the run's test predictions (sklearn's functions)."""
    from sklearn.metrics import accuracy_score, recall_score

    test = run.dataset.test
    predicted = np.argmax(np.asarray(train.probabilities_fn(run.recipe)(run.state, test.images)), -1)
    return (float(recall_score(test.labels, predicted, labels=[label], average=None)[0]),
            float(accuracy_score(test.labels, predicted)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cut_class", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    config = cnn.load_config(os.path.join(REPO, "configs", "digits.py"))
    config.train.pictures = False
    full = cnn.load_dataset(config.data)
    rows = {None: [], "balanced": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            dataset = cut(full, args.cut_class, args.fraction, seed)
            for weights in rows:
                run_config = config.copy_and_resolve_references()
                run_config.seed, run_config.train.class_weights = seed, weights
                run = cnn.train_and_evaluate(run_config, os.path.join(tmp, f"{seed}-{weights}"), dataset=dataset)
                rows[weights].append(recall_and_accuracy(run, args.cut_class))
    kept = int((dataset.train.labels == args.cut_class).sum())
    print(f"\ndigits, class {args.cut_class} cut to {args.fraction:.0%} of its training examples ({kept} of "
          f"{int((full.train.labels == args.cut_class).sum())}; {len(dataset.train)} training examples in all), "
          f"configs/digits.py ({config.train.num_epochs} epochs), {args.seeds} seeds, {time.strftime('%Y-%m-%d')}\n")
    print(f"| train.class_weights | recall of class {args.cut_class} per seed | mean ± std | test accuracy |")
    print("|---|---|---|---|")
    for weights, results in rows.items():
        recalls, accuracies = [r for r, _ in results], [a for _, a in results]
        print(f"| {weights!r} | {', '.join(f'{r:.2f}' for r in recalls)} | {statistics.mean(recalls):.3f} ± "
              f"{statistics.pstdev(recalls):.3f} | {statistics.mean(accuracies):.2%} |")


if __name__ == "__main__":
    main()
