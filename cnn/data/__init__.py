"""Datasets as in-memory arrays, and the batches a training loop reads.

Sources, chosen by `config.data.name` from the registry in cnn/data_sources.py:
- 'digits' and 'synthetic_series' (data/embedded.py): no download, no preparation;
- your own data at `data.path`: 'image_folder' and 'text_folder' (data/folders.py),
  'series_file' (data/series.py), 'npz' (data/arrays.py, which also holds
  `from_arrays` for arrays in a notebook);
- 'mnist', 'fashion_mnist' and 'kmnist' from their original archives in
  `data.manual_dir` (data/idx.py, numpy only), or else through TFDS;
- any TFDS image- or text-classification dataset (data/tfds.py), prepared once.
Sources that decode keep the arrays in one cache (data/cache.py). Then
`load_dataset` resizes and converts channels where the config asks.
"""

from __future__ import annotations

import ml_collections

from cnn.data.arrays import NAME as ARRAYS
from cnn.data.arrays import from_arrays
from cnn.data.batches import chunk_steps, epoch_index, eval_index, host_batch, stage_chunk, staged_chunks
from cnn.data import stream
from cnn.data.dataset import Dataset, Split, describe, holds_images
from cnn.data.stream import DiskArray
from cnn.data.images import Augmentation, augment, preprocess, resize, to_channels
from cnn.data.text import OOV, PAD, build_vocabulary, encode, words
from cnn import data_sources
from cnn.errors import ConfigError

__all__ = ["ARRAYS", "Augmentation", "Dataset", "DiskArray", "OOV", "PAD", "Split", "augment",
           "build_vocabulary", "chunk_steps", "describe", "encode", "epoch_index", "eval_index", "from_arrays",
           "holds_images", "host_batch", "input_shape", "load_dataset", "preprocess", "resize", "stage_chunk", "staged_chunks", "to_channels", "words"]


def load_dataset(data: ml_collections.ConfigDict, seed: int = 0) -> Dataset:
    """Loads both splits of `data.name` into memory, resized to `data.image_size` and converted to
    `data.channels` where those are set.

    `seed` (the run's config.seed) draws the test split held out of your own
    data when it has none (data.test_path=None).
    """
    source = data_sources.find(data.name)
    if source.reads_path and not data.get("path"):
        raise ConfigError(f"data.name={data.name!r} reads your own data: set data.path to {source.description}")
    return conform(data_sources.resolve(source.loader)(data, seed), data)


def conform(dataset: Dataset, data: ml_collections.ConfigDict) -> Dataset:
    """Applies `data.image_size` and `data.channels` to a loaded dataset, and checks `data.mean` against it."""
    for field in ("image_size", "channels"):
        if data.get(field) is not None and not dataset.is_image:
            raise ConfigError(f"data.{field}={data[field]!r} applies to images, but {dataset.name} holds sequences "
                              f"shaped {dataset.input_shape}; leave data.{field}=None")
    for split in (dataset.train, dataset.test):
        if isinstance(split.images, DiskArray):
            _check_streamed(split.images, data)
            continue
        if data.get("image_size") is not None:
            split.images = resize(split.images, tuple(int(v) for v in data.image_size))
        if data.get("channels") is not None:
            split.images = to_channels(split.images, data.channels)
    if data.get("mean") is not None and len(data.mean) not in (1, dataset.input_shape[-1]):
        raise ConfigError(f"data.mean={tuple(data.mean)!r} has {len(data.mean)} values but the images have "
                          f"{dataset.input_shape[-1]} channels")
    return dataset


def _check_streamed(images: DiskArray, data: ml_collections.ConfigDict) -> None:
    """A streamed set is used as decoded: a resize or channel change it still needs is refused, naming the fix."""
    size, channels = data.get("image_size"), data.get("channels")
    if size is not None and tuple(images.shape[1:3]) != tuple(int(v) for v in size):
        stream.refuse_conversion("image_size", tuple(size), images.shape)
    if channels is not None and images.shape[-1] != channels:
        stream.refuse_conversion("channels", channels, images.shape)


def input_shape(data: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The input shape `load_dataset(data)` would give, from the dataset's description where it has one."""
    source = data_sources.find(data.name)
    if source.input_shape is None:
        return load_dataset(data).input_shape  # quick to make, or decoded once and then read from the cache
    shape = data_sources.resolve(source.input_shape)(data)
    if data.get("image_size") is not None and len(shape) == 3:
        shape = (*(int(v) for v in data.image_size), shape[-1])
    if data.get("channels") is not None and len(shape) == 3:
        shape = (*shape[:2], int(data.channels))
    if None in shape:
        raise ConfigError(f"data.name={data.name!r} has images of varying size {shape}; set data.image_size=(height, "
                          "width), or pass input_shape to summary()")
    return tuple(int(v) for v in shape)
