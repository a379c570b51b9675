"""MNIST, Fashion-MNIST and Kuzushiji-MNIST read with numpy from their four original IDX archives.

With `data.manual_dir` set, 'mnist', 'fashion_mnist' and 'kmnist' come
straight from train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz there (or the same
names without .gz): no TFDS preparation, no TensorFlow. The arrays are TFDS's
exactly, the same images, labels and class names in the same order, so a run
gives the same result either way; split slices ('train[:20%]') mean what they
mean to TFDS. Only TFDS's description of the set is used (class names, the
archives' SHA-256 checksums, the order its preparation writes), which needs
no TensorFlow either.

The decoded splits and class names are kept in the decoded-array cache
(cnn/data/cache.py), keyed by each archive's path, size and modification
time: decoding, ordering and TFDS's description take most of a second, and
a later run reads the cached arrays in a few hundredths without importing
TFDS, which is much of a warm start-up's budget. A set this small is always
held in memory (data.max_memory_gb does not apply). The archives win over a
copy TFDS has prepared in data.data_dir: they hold the same arrays. Without data.manual_dir these sets load through
TFDS (cnn/data/tfds.py), downloading and preparing them once.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import ml_collections
import numpy as np

import cnn.data.cache as cache_lib
import cnn.data.tfds as tfds_lib
from cnn.data.dataset import Dataset, Split
from cnn.errors import ConfigError

# TFDS's split name -> its (images, labels) archives.
ARCHIVES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
            "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IMAGE_SHAPE = (28, 28)


def load(data: ml_collections.ConfigDict, seed: int = 0) -> Dataset:
    """Both splits from the archives in data.manual_dir (decoded once, then from the cache), else through TFDS
    (`seed` is unused: these sets come with their test split)."""
    if not data.get("manual_dir"):
        return tfds_lib.load_tfds(data)
    paths = [_find_archive(data, name) for pair in ARCHIVES.values() for name in pair]
    settings = {"name": data.name, "train_split": data.train_split, "test_split": data.test_split}
    key = {**settings, "archives": [_stamp(path) for path in paths if path]}
    # One missing: decoding names it, after any file in the folder that TFDS's checksums refuse.
    folder = cache_lib.entry_folder(data, "idx", data.manual_dir, settings) if data.cache and all(paths) else None
    entry, _ = cache_lib.cached(folder, key, lambda: _decode(data))
    a = entry.arrays
    return Dataset(data.name, Split(a["train_images"], a["train_labels"]), Split(a["test_images"], a["test_labels"]),
                   list(entry.info["class_names"]))


def _stamp(path: str) -> list:
    stat = os.stat(path)
    return [os.path.realpath(path), stat.st_size, stat.st_mtime_ns]


def _decode(data: ml_collections.ConfigDict) -> cache_lib.Entry:
    """The configured splits read from the archives, checked against TFDS's description of the set."""
    builder = tfds_lib.tfds_builder(data)
    tfds_lib.check_manual_files(builder, data)  # a .gz of another set, or cut short
    class_names = list(builder.info.features["label"].names)
    rows = {split: _read_split(data, split, len(class_names)) for split in ARCHIVES}
    train, test = (_select(rows, data[field], field, data.name) for field in ("train_split", "test_split"))
    return cache_lib.Entry({"train_images": train.images, "train_labels": train.labels, "test_images": test.images,
                            "test_labels": test.labels}, {"class_names": class_names})


def _read_split(data: ml_collections.ConfigDict, split: str, num_classes: int) -> Split:
    """One split's images (N, 28, 28, 1) and labels, in the order TFDS's preparation writes them."""
    images_path, labels_path = (_archive(data, name) for name in ARCHIVES[split])
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if images.shape[1:] != IMAGE_SHAPE:
        raise ConfigError(f"data.manual_dir: {images_path} holds images of {images.shape[1:]}, not "
                          f"{IMAGE_SHAPE}; it is another dataset's file: copy the right one")
    if len(labels) != len(images) or (len(labels) and labels.max() >= num_classes):
        raise ConfigError(f"data.manual_dir: {labels_path} holds {len(labels)} labels up to "
                          f"{labels.max() if len(labels) else None} for {len(images)} images of {num_classes} "
                          f"classes in {os.path.basename(images_path)}; copy both files of the same set again")
    order = _tfds_order(split, len(labels))
    return Split(images[order][..., None], labels[order].astype(np.int32))


def _find_archive(data: ml_collections.ConfigDict, name: str) -> str | None:
    """The path of archive `name` in data.manual_dir, gzipped or not; None if neither is there."""
    folder = data.manual_dir
    return next((path for path in (os.path.join(folder, name), os.path.join(folder, name.removesuffix(".gz")))
                 if os.path.isfile(path)), None)


def _archive(data: ml_collections.ConfigDict, name: str) -> str:
    """The path of archive `name` in data.manual_dir, gzipped or not; a ConfigError naming it if neither is there."""
    path = _find_archive(data, name)
    if path is not None:
        return path
    folder = data.manual_dir
    every = ", ".join(file for pair in ARCHIVES.values() for file in pair)
    raise ConfigError(f"data.manual_dir: {os.path.join(folder, name)} does not exist; copy {data.name}'s four "
                      f"original archives there ({every}), or leave data.manual_dir unset to load it through TFDS")


def read_idx(path: str, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions (gzipped or not) as a uint8 array.

    The header is a magic number (0x0000 08 `ndim`) and `ndim` big-endian
    sizes; a file that is not one, or holds fewer or more bytes than its
    sizes say (a copy cut short), is a ConfigError naming it.
    """
    try:
        with open(path, "rb") as f:
            raw = gzip.decompress(f.read()) if path.endswith(".gz") else f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a gzip cut short, an EOFError
        raise ConfigError(f"data.manual_dir: {path} could not be read ({type(e).__name__}: {e}); copy it "
                          "again") from None
    start = 4 + 4 * ndim
    if len(raw) < start or raw[:4] != bytes((0, 0, 8, ndim)):
        raise ConfigError(f"data.manual_dir: {path} is not an IDX file of {ndim}-dimensional bytes (it starts "
                          f"with {raw[:4].hex() or 'nothing'}, not 000008{ndim:02x}); copy the original again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - start != math.prod(shape):
        raise ConfigError(f"data.manual_dir: {path} holds {len(raw) - start:,} bytes of data but its header says "
                          f"{shape} ({math.prod(shape):,}); it is cut short or damaged: copy it again")
    return np.frombuffer(raw, np.uint8, offset=start).reshape(shape)


def _tfds_order(split: str, count: int) -> np.ndarray:
    """TFDS writes example i of a split at the rank of the MD5 of (split name, i): the same permutation here."""
    from tensorflow_datasets.core.hashing import Hasher

    hasher = Hasher(split)
    return np.array(sorted(range(count), key=hasher.hash_key), np.int64)


def _select(rows: dict[str, Split], spec: str, field: str, name: str) -> Split:
    """The rows TFDS's split string `spec` ('train', 'train[:20%]', 'train[:5000]+test', ...) names."""
    import tensorflow_datasets as tfds

    infos = {split: tfds.core.SplitInfo(name=split, shard_lengths=[len(r)], num_bytes=0) for split, r in rows.items()}
    try:
        parts = tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos)
    except (ValueError, AssertionError) as e:
        detail = str(e).splitlines()[0]
        raise ConfigError(f"data.{field}={spec!r} is not a split of {name} ({detail}); it has "
                          f"{', '.join(rows)} (slices such as 'train[:90%]' work too)") from None
    pieces = [(rows[p.splitname].images[p.from_:p.to], rows[p.splitname].labels[p.from_:p.to]) for p in parts]
    if len(pieces) == 1:
        return Split(*pieces[0])
    return Split(np.concatenate([x for x, _ in pieces]), np.concatenate([y for _, y in pieces]))
