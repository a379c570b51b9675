"""The in-memory dataset every source produces, and what a finished run records about it."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cnn.data.images import ink_box
from cnn.data.stream import DiskArray


@dataclasses.dataclass
class Split:
    # The inputs, named for the common case: uint8 images (N, height, width,
    # channels), int32 token ids (N, length) or float32 series (N, length, channels);
    # a DiskArray (read by rows) when the data is larger than data.max_memory_gb.
    images: np.ndarray | DiskArray
    labels: np.ndarray  # int32, (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    class_names: list[str]
    # Files a source could not read, as (path, reason): skipped, never silently
    # dropped; training lists them in WORKDIR/skipped_files.txt.
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.images.shape[1:])

    @property
    def input_path(self) -> str:
        """'streamed' when the training inputs are read from disk by rows (larger than data.max_memory_gb)."""
        return "streamed" if isinstance(self.train.images, DiskArray) else "memory"

    @property
    def is_image(self) -> bool:
        return holds_images(self.train.images)


def holds_images(inputs: np.ndarray | DiskArray) -> bool:
    """Whether `inputs` are images (uint8, N x height x width x channels) rather than series or token ids: what
    decides the wording ('images', 'examples') and what is drawn."""
    return inputs.dtype == np.uint8 and inputs.ndim == 4


def describe(dataset: Dataset) -> dict[str, Any]:
    """What prediction needs from the training data, kept in results.json so it never reloads the data.

    `border_brightness`: the mean pixel (0-255) on the edges of the training
    images; near 0 for MNIST's white-on-black digits, which tells prediction
    to invert a black-on-white drawing. `ink_extent`: on such plain
    backgrounds, the typical size of the object as a fraction of the image,
    so a drawing is framed alike.
    """
    images = dataset.train.images
    info = {"class_names": [str(n) for n in dataset.class_names], "input_shape": [int(v) for v in dataset.input_shape]}
    if not dataset.is_image:
        return info  # token ids or series: nothing to invert or frame
    border = _border(images)
    info["border_brightness"] = round(border, 2)
    if border < 64 or border > 191:
        sample = images[np.random.default_rng(0).permutation(len(images))[:2000]].mean(axis=-1)
        extents = [e for e in (ink_box(image, border)[1] for image in sample) if e is not None]
        if extents:
            info["ink_extent"] = round(float(np.median(extents)), 3)
    return info


def _border(images: np.ndarray | DiskArray) -> float:
    """The mean of the four edges' means; a streamed set is read once, a piece at a time."""
    if not isinstance(images, DiskArray):
        edges = [images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]]
        return float(np.mean([e.mean(dtype=np.float64) for e in edges]))
    sums = np.zeros(4)
    for _, piece in images.pieces():
        edges = [piece[:, 0], piece[:, -1], piece[:, :, 0], piece[:, :, -1]]
        sums += [e.sum(dtype=np.float64) for e in edges]
    sizes = [len(images) * np.prod(e.shape[1:]) for e in (images[:1][:, 0], images[:1][:, :, 0])]
    return float(np.mean(sums / np.array([sizes[0], sizes[0], sizes[1], sizes[1]])))
