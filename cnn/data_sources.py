"""Where each `config.data.name` comes from: one registry entry per data source.

`cnn.data.load_dataset` and `cnn.data.input_shape` look the name up here, and
`cnn.config` checks `data.path` against it. The loaders are named as
"module:function" and imported on first use, so this module stays light: the
config schema reads it without importing JAX, TFDS or scikit-learn. Any name
not in `SOURCES` is a TFDS dataset (`TFDS`). Adding a source is one entry.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

__all__ = ["IDX_SETS", "OWN_DATA", "SOURCES", "Source", "TFDS", "find", "resolve"]


@dataclasses.dataclass(frozen=True)
class Source:
    """How one data.name is read."""

    # One line saying what it is; for a source that reads data.path, what that path must hold.
    description: str
    # "module:function", called as (data: ConfigDict, seed: int) -> Dataset; seed draws a held-out test split.
    loader: str
    # "module:function", (data) -> the input shape from the dataset's description, without loading its
    # examples; None: load_dataset(data) and look (the arrays are cached or quick to make).
    input_shape: str | None = None
    # Reads your own files at data.path (and data.test_path).
    reads_path: bool = False


# TFDS names whose four original IDX archives (train-images-idx3-ubyte.gz, ...) cnn reads itself.
IDX_SETS = ("mnist", "fashion_mnist", "kmnist")

_IDX = Source("a TFDS set read with numpy from its four original IDX archives in data.manual_dir (no TensorFlow), "
              "else through TFDS", "cnn.data.idx:load", "cnn.data.tfds:input_shape")

SOURCES: dict[str, Source] = {
    "digits": Source("scikit-learn's 1,797 8x8 digits, offline", "cnn.data.embedded:load_digits"),
    "synthetic_series": Source("noisy sine, square, sawtooth and triangle waves, generated offline",
                               "cnn.data.embedded:load_synthetic_series"),
    "image_folder": Source("a folder of class folders of images (ROOT/<class>/<files>)",
                           "cnn.data.folders:load_folders", reads_path=True),
    "text_folder": Source("a folder of class folders of text files (ROOT/<class>/<files>)",
                          "cnn.data.folders:load_folders", reads_path=True),
    "series_file": Source("a .ts, .tsv or .csv file of labelled series", "cnn.data.series:load_series_file",
                          reads_path=True),
    "npz": Source("an .npz file of x_train, y_train (and x_test, y_test)", "cnn.data.arrays:load_npz",
                  reads_path=True),
    **dict.fromkeys(IDX_SETS, _IDX),
}

# Every other name: prepared once by TFDS (TensorFlow), then read from its files and cnn's cache.
TFDS = Source("any TFDS image- or text-classification dataset, by its TFDS name", "cnn.data.tfds:load_tfds",
              "cnn.data.tfds:input_shape")

OWN_DATA = tuple(name for name, source in SOURCES.items() if source.reads_path)  # the names that read data.path


def find(name: str) -> Source:
    """The source of data.name `name`: its registry entry, else TFDS."""
    return SOURCES.get(name, TFDS)


def resolve(target: str) -> Callable:
    """The function a "module:function" entry names, its module imported now."""
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)
