"""Datasets that need no download: scikit-learn's digits and seeded synthetic series."""

from __future__ import annotations

import ml_collections
import numpy as np

from cnn.data.dataset import Dataset, Split


def load_digits(data: ml_collections.ConfigDict | None = None, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, split 80/20 by a fixed stratified shuffle (not by `seed`: every run
    compares on the same test split)."""
    from sklearn.datasets import load_digits as sklearn_digits  # scikit-learn only for this set
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.2, random_state=0,
                                                        stratify=labels)
    return Dataset("digits", Split(x_train, y_train), Split(x_test, y_test), [str(i) for i in range(10)])


def load_synthetic_series(data: ml_collections.ConfigDict, seed: int = 0, train_size: int = 3000,
                          test_size: int = 1000) -> Dataset:
    """Noisy sine, square, sawtooth and triangle waves (N, data.max_length or 128, 1), classified by shape.

    Frequency (1 to 6 cycles), phase, amplitude, offset and noise are drawn per
    example from a fixed seed (not `seed`), so the set is the same everywhere.
    """
    length = data.get("max_length") or 128
    rng = np.random.default_rng(1998)
    n = train_size + test_size
    labels = rng.integers(0, 4, n).astype(np.int32)
    t = np.linspace(0, 1, length, endpoint=False, dtype=np.float32)
    cycles = rng.uniform(1, 6, (n, 1)) * t + rng.uniform(0, 1, (n, 1))
    frac = cycles - np.floor(cycles)
    waves = np.stack([np.sin(2 * np.pi * cycles), np.where(frac < 0.5, 1.0, -1.0), 2 * frac - 1,
                      4 * np.abs(frac - 0.5) - 1])  # (4, n, length)
    x = waves[labels, np.arange(n)] * rng.uniform(0.5, 2, (n, 1)) + rng.normal(0, 0.5, (n, 1))
    x = (x + rng.normal(0, 0.3, x.shape)).astype(np.float32)[..., None]
    names = ["sine", "square", "sawtooth", "triangle"]
    return Dataset("synthetic_series", Split(x[:train_size], labels[:train_size]),
                   Split(x[train_size:], labels[train_size:]), names)
