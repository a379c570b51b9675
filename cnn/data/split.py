"""The test split held out of the training data when a source has none (data.test_path=None)."""

from __future__ import annotations

import numpy as np

from cnn.data.dataset import Split
from cnn.errors import ConfigError


def hold_out(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), both sorted: `fraction` of each class's examples go to the test split.

    Stratified, so a small class is not left out of either split by chance:
    each class gives round(fraction * n) examples, at least one and never
    all of them (a class with one example stays in training). Drawn from
    `seed` alone, so a resumed run or another machine holds out the same ones.
    """
    rng = np.random.default_rng([int(seed), 20_17])
    test = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        if len(members) < 2:
            continue
        count = min(max(int(round(fraction * len(members))), 1), len(members) - 1)
        test.append(rng.permutation(members)[:count])
    if not test:
        raise ConfigError(f"data.test_fraction={fraction}: no class has two examples, so none can be held out for "
                          "testing; add examples or give the test data as data.test_path")
    test = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(labels)), test), test


def split_off(inputs: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[Split, Split]:
    """(train, test) Splits of `inputs` and int32 `labels`, the test one held out by `hold_out`."""
    train, test = hold_out(labels, fraction, seed)
    return Split(inputs[train], labels[train]), Split(inputs[test], labels[test])
