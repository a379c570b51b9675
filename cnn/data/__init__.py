"""Datasets as in-memory arrays, and the batches a training loop reads.

Sources, chosen by `config.data.name`:
- 'digits' and 'synthetic_series' (data/embedded.py): no download, no preparation;
- your own data at `data.path`: 'image_folder' and 'text_folder' (data/folders.py),
  'series_file' (data/series.py), 'npz' (data/arrays.py, which also holds
  `from_arrays` for arrays in a notebook);
- any TFDS image- or text-classification dataset (data/tfds.py), prepared once.
Sources that decode keep the arrays in one cache (data/cache.py). Then
`load_dataset` resizes and converts channels where the config asks.
"""

from __future__ import annotations

import ml_collections

from cnn.data.arrays import NAME as ARRAYS
from cnn.data.arrays import from_arrays, load_npz
from cnn.data.batches import chunk_steps, epoch_index, eval_index, host_batch, stage_chunk, staged_chunks
from cnn.data import stream
from cnn.data.dataset import Dataset, Split, describe, holds_images
from cnn.data.stream import DiskArray
from cnn.data.embedded import EMBEDDED, load_digits, load_synthetic_series
from cnn.data.folders import load_folders
from cnn.data.images import Augmentation, augment, preprocess, resize, to_channels
from cnn.data.series import load_series_file
from cnn.data.text import OOV, PAD, build_vocabulary, encode, words
from cnn.data.tfds import load_tfds
from cnn.data.tfds import input_shape as tfds_input_shape
from cnn.errors import ConfigError

__all__ = ["ARRAYS", "Augmentation", "Dataset", "DiskArray", "EMBEDDED", "OOV", "OWN_DATA", "PAD", "Split", "augment",
           "build_vocabulary", "chunk_steps", "describe", "encode", "epoch_index", "eval_index", "from_arrays",
           "holds_images", "host_batch", "input_shape", "load_dataset", "preprocess", "resize", "stage_chunk", "staged_chunks", "to_channels", "words"]

# data.name of each source that reads your own files at data.path, and its loader (data, seed) -> Dataset.
OWN_DATA = {"image_folder": load_folders, "text_folder": load_folders, "series_file": load_series_file,
            "npz": load_npz}


def load_dataset(data: ml_collections.ConfigDict, seed: int = 0) -> Dataset:
    """Loads both splits of `data.name` into memory, resized to `data.image_size` and converted to
    `data.channels` where those are set.

    `seed` (the run's config.seed) draws the test split held out of your own
    data when it has none (data.test_path=None).
    """
    if data.name == "digits":
        dataset = load_digits()
    elif data.name == "synthetic_series":
        dataset = load_synthetic_series(data.get("max_length") or 128)
    elif data.name in OWN_DATA:
        if not data.get("path"):
            raise ConfigError(f"data.name={data.name!r} reads your own data: set data.path to "
                              + ("a folder of class folders (ROOT/<class>/<files>)" if data.name.endswith("_folder")
                                 else "the .npz file" if data.name == "npz" else "a .ts, .tsv or .csv file"))
        dataset = OWN_DATA[data.name](data, seed)
    else:
        dataset = load_tfds(data)
    return conform(dataset, data)


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
    """The input shape `load_dataset(data)` would give, from the dataset's description where it can."""
    if data.name in OWN_DATA:
        return load_dataset(data).input_shape  # decoded once, then from the cache
    if data.name == "digits":
        shape = (8, 8, 1)
    elif data.name == "synthetic_series":
        shape = (data.get("max_length") or 128, 1)
    else:
        shape = tfds_input_shape(data)
    if data.get("image_size") is not None and len(shape) == 3:
        shape = (*(int(v) for v in data.image_size), shape[-1])
    if data.get("channels") is not None and len(shape) == 3:
        shape = (*shape[:2], int(data.channels))
    if None in shape:
        raise ConfigError(f"data.name={data.name!r} has images of varying size {shape}; set data.image_size=(height, "
                          "width), or pass input_shape to summary()")
    return tuple(int(v) for v in shape)
