"""Predictions from a trained run: class probabilities for arrays, files or PIL images.

    cnn.predict("runs/mnist", images, top_k=3)  # or the TrainResult of cnn.train_and_evaluate

Inputs of another size or colour mode are converted first (cnn/inference/convert.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image

from cnn.errors import ConfigError
from cnn.inference.convert import INVERT, convert, open_image
from cnn.progress import progress
from cnn.run import load_run
from cnn.train import TrainResult, probabilities_fn


def as_run(source: TrainResult | str | os.PathLike) -> TrainResult:
    """A TrainResult as given, or loaded from a workdir path."""
    return load_run(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else source


def input_shape(run: TrainResult) -> tuple[int, ...]:
    """The (height, width, channels) the model takes."""
    if "input_shape" in run.results:
        return tuple(run.results["input_shape"])
    raise ConfigError("this TrainResult does not record its input shape; load the run with cnn.load_run(WORKDIR)")


def input_dtype(run: TrainResult) -> np.dtype:
    """The dtype the model takes raw: uint8 pixels (height, width, channels), int32 token ids (length,) or float32
    series (length, channels), as cnn/data gives them."""
    return np.dtype({3: np.uint8, 1: np.int32}.get(len(input_shape(run)), np.float32))


def probabilities(run: TrainResult, images: np.ndarray, batch_size: int = 500,
                  description: str | None = None) -> np.ndarray:
    """Class probabilities (N, classes) for inputs already shaped like the training inputs."""
    apply = probabilities_fn(run.recipe)
    n = len(images)
    batch_size = max(1, min(batch_size, n))
    starts = range(0, n, batch_size)
    if description:
        starts = progress(starts, len(starts), description, unit="batch")
    out = []
    for start in starts:
        batch = images[start:start + batch_size]
        pad = batch_size - len(batch)  # one shape, one compilation
        if pad:
            batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
        out.append(np.asarray(apply(run.state, batch))[:batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, len(run.class_names)), np.float32)


def top_classes(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """The k most probable (class name, probability) pairs of each row, most probable first."""
    k = max(1, min(int(k), probs.shape[-1]))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(str(class_names[j]), float(row[j])) for j in idx] for row, idx in zip(probs, order)]


def predict(source: TrainResult | str | os.PathLike, images, top_k: int = 3, invert: str = "auto",
            frame: bool = True) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) pairs for each image, most probable first.

    `source` is a workdir or the TrainResult of `cnn.train_and_evaluate`.
    `images` is a batch array (N, H, W[, C]), one image array, a PIL image,
    a file path, or a list of these; uint8 pixels, or floats in [0, 1].
    Images of another size or colour mode are converted, with a note on
    stderr (see `cnn.inference.convert` for `invert` and `frame`).
    """
    run = as_run(source)
    shape = input_shape(run)
    if invert not in INVERT:
        raise ConfigError(f"invert={invert!r} must be one of {', '.join(INVERT)}")
    arrays, notes = [], {}
    for item in _items(images, shape):
        if isinstance(item, (str, os.PathLike)):
            item = open_image(os.fspath(item))
        elif not isinstance(item, (np.ndarray, Image.Image)):
            item = np.asarray(item)
        if isinstance(item, np.ndarray) and item.shape == shape and (item.dtype == np.uint8 or len(shape) != 3):
            arrays.append(item if len(shape) == 3 else  # series (float32) or token ids (int32), as trained
                          item.astype(np.int32 if np.issubdtype(item.dtype, np.integer) else np.float32))
            continue
        array, item_notes = convert(item, shape, run.results, invert, frame)
        arrays.append(array)
        for note in item_notes:
            notes[note] = notes.get(note, 0) + 1
    for note, count in notes.items():
        print(f"note: {count} image{'s' if count > 1 else ''} {note}", file=sys.stderr)
    if not arrays:
        return []
    return top_classes(probabilities(run, np.stack(arrays)), run.class_names, top_k)


def _items(images, shape: tuple[int, ...]) -> list:
    """A batch array (with channels, or grayscale without), a list, or one image, as a list of images.

    For series and token ids (`shape` not an image's) a batch has one axis more than one input."""
    if isinstance(images, np.ndarray) and len(shape) != 3:
        return list(images) if images.ndim == len(shape) + 1 else [images]
    if isinstance(images, np.ndarray) and (images.ndim == 4 or (images.ndim == 3 and images.shape[-1] not in (1, 3, 4))):
        return list(images)
    return list(images) if isinstance(images, (list, tuple)) else [images]
