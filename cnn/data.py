"""Datasets as in-memory uint8 arrays, and the batches a training loop reads.

Two sources, chosen by `config.data.name`:
- 'digits': the 8x8 handwritten digits that ship inside scikit-learn, so a
  first run needs no network and no preparation;
- any TFDS image-classification dataset ('mnist', 'fashion_mnist',
  'eurosat/rgb', ...), prepared with TFDS (offline from `data.manual_dir`) and
  decoded once into a cache of arrays beside the prepared files, so later runs
  skip decoding and never import TensorFlow.

Images stay uint8 until `preprocess`, which runs inside the compiled step.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn.config import ConfigError
from cnn.progress import progress

EMBEDDED = ("digits",)


@dataclasses.dataclass
class Split:
    images: np.ndarray  # uint8, (N, height, width, channels)
    labels: np.ndarray  # int32, (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.images.shape[1:])


def load(data: ml_collections.ConfigDict) -> Dataset:
    """Loads both splits of `data.name` into memory, resized if `data.image_size` is set."""
    if data.name == "digits":
        dataset = _load_digits()
    else:
        dataset = _load_tfds(data)
    if data.image_size is not None:
        size = tuple(int(v) for v in data.image_size)
        for split in (dataset.train, dataset.test):
            split.images = resize(split.images, size)
    if data.mean is not None and len(data.mean) not in (1, dataset.input_shape[-1]):
        raise ConfigError(f"data.mean={tuple(data.mean)!r} has {len(data.mean)} values but the images have "
                          f"{dataset.input_shape[-1]} channels")
    return dataset


def preprocess(images: jax.Array, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
               ) -> jax.Array:
    """uint8 images to float32 in [0, 1], then (x - mean) / std if given (data.mean, data.std)."""
    x = images.astype(jnp.float32) / 255.0
    if mean is not None:
        x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x


def resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes uint8 images (N, H, W, C) to `size` bilinearly; a no-op at the same size."""
    from PIL import Image

    if images.shape[1:3] == tuple(size):
        return images
    height, width = size
    out = np.empty((len(images), height, width, images.shape[-1]), np.uint8)
    for i, image in enumerate(images):
        channels = [Image.fromarray(image[..., c]).resize((width, height), Image.BILINEAR)
                    for c in range(image.shape[-1])]
        out[i] = np.stack([np.asarray(c) for c in channels], axis=-1)
    return out


def _load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits, split 80/20 by a fixed stratified shuffle."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.2, random_state=0,
                                                        stratify=labels)
    return Dataset("digits", Split(x_train, y_train), Split(x_test, y_test), [str(i) for i in range(10)])


# --- TFDS ---------------------------------------------------------------------


def data_dir(data: ml_collections.ConfigDict) -> str:
    """Where prepared TFDS data lives: data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.path.expanduser(data.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _cache_path(data: ml_collections.ConfigDict, split: str) -> str:
    return os.path.join(data_dir(data), "cnn_cache", data.name.replace("/", "__").replace(":", "-"), f"{split}.npz")


def _load_tfds(data: ml_collections.ConfigDict) -> Dataset:
    splits = {}
    class_names = None
    if data.cache:
        for split in (data.train_split, data.test_split):
            path = _cache_path(data, split)
            if os.path.exists(path):
                with np.load(path) as f:
                    splits[split] = Split(f["images"], f["labels"])
                    class_names = [str(n) for n in f["class_names"]]
    if len(splits) < 2:
        splits, class_names = _read_tfds(data)
        if data.cache:
            for split, arrays in splits.items():
                _write_cache(_cache_path(data, split), arrays, class_names)
    return Dataset(data.name, splits[data.train_split], splits[data.test_split], class_names)


def _write_cache(path: str, split: Split, class_names: list[str]) -> None:
    """Writes atomically, so a run killed mid-write leaves no half file behind."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, images=split.images, labels=split.labels, class_names=np.array(class_names))
    os.replace(tmp, path)


def _builder(data: ml_collections.ConfigDict):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(data.name, data_dir=data_dir(data))
    except tfds.core.registered.DatasetNotFoundError:
        known = [*EMBEDDED, *tfds.list_builders()]
        close = difflib.get_close_matches(data.name, known, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ConfigError(f"data.name={data.name!r} is not a known dataset; {hint}use 'digits' (offline, built in) "
                          "or any TFDS image-classification dataset such as 'mnist' or 'fashion_mnist'") from None
    except ValueError as e:  # a known dataset with an unknown config, e.g. 'eurosat/rgbb'
        base = data.name.split("/")[0].split(":")[0]
        try:
            known = [f"{base}/{c.name}" for c in tfds.builder_cls(base).BUILDER_CONFIGS]
        except Exception:
            known = []
        found = re.search(r"BuilderConfig \S+ not found", str(e))
        detail = found.group(0) if found else str(e).splitlines()[0][:200]
        raise ConfigError(f"data.name={data.name!r}: {detail}"
                          + (f"; {base} has {', '.join(map(repr, known[:8]))}" if known else "")) from None


def _read_tfds(data: ml_collections.ConfigDict) -> tuple[dict[str, Split], list[str]]:
    builder = _builder(data)
    info = builder.info
    keys = info.supervised_keys
    if not keys or len(keys) != 2 or not hasattr(info.features[keys[1]], "num_classes"):
        raise ConfigError(f"data.name={data.name!r} is not an image-classification dataset "
                          "(it has no (image, label) supervised keys)")
    image_key, label_key = keys
    for field, split in (("data.train_split", data.train_split), ("data.test_split", data.test_split)):
        base = split.split("[")[0].split("+")[0]
        if info.splits and base not in info.splits:
            raise ConfigError(f"{field}={split!r} is not a split of {data.name}; it has "
                              f"{', '.join(info.splits.keys())} (slices such as 'train[:90%]' work too)")
    _prepare(builder, data)
    splits = {}
    for split in (data.train_split, data.test_split):
        splits[split] = _decode(builder, split, image_key, label_key, data)
    return splits, list(info.features[label_key].names)


def _prepare(builder, data: ml_collections.ConfigDict) -> None:
    import tempfile

    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import downloader

    if builder.is_prepared():
        return
    _say(f"Preparing {data.name} in {builder.data_dir} (once; TFDS needs TensorFlow for this step)...")
    if not sys.stderr.isatty():
        tfds.disable_progress_bar()  # its bars are one line per update in a log file
    start = time.time()
    # TFDS unpacks archives into a folder shared by all datasets and reuses
    # files by name, so MNIST and Fashion-MNIST (same file names) would mix:
    # give each preparation its own. And TFDS retries a failing download 10
    # times with backoff (~200 s offline); fail in seconds instead.
    retries, downloader.MAX_RETRIES = downloader.MAX_RETRIES, 1
    try:
        with tempfile.TemporaryDirectory(prefix="cnn-extract-") as extract_dir:
            config = tfds.download.DownloadConfig(manual_dir=data.manual_dir, extract_dir=extract_dir)
            builder.download_and_prepare(download_config=config, file_format="array_record")
    except Exception as e:  # TFDS raises many types here; all mean "could not get the files"
        where = (f"the files in data.manual_dir={data.manual_dir!r} did not work ({type(e).__name__}: "
                 f"{str(e).splitlines()[0][:300]})" if data.manual_dir
                 else f"it could not be downloaded ({type(e).__name__})")
        raise ConfigError(
            f"data.name={data.name!r} is not prepared in {data_dir(data)} and {where}. Offline, pass "
            "--config.data.manual_dir=FOLDER, a folder holding the dataset's original archive files "
            "(for MNIST: ../shared/datasets/mnist), or point --config.data.data_dir (or $TFDS_DATA_DIR) at a "
            "folder where it is already prepared.") from None
    finally:
        downloader.MAX_RETRIES = retries
    _say(f"Prepared {data.name} in {time.time() - start:.1f}s")


def _decode(builder, split: str, image_key: str, label_key: str, data: ml_collections.ConfigDict) -> Split:
    """Reads one split into arrays. Prepared array_record data reads without TensorFlow."""
    start = time.time()
    source = builder.as_data_source(split=split)
    try:
        examples = source.__getitems__(range(len(source)))  # one bulk read: ~2x faster than indexing
    except TypeError:  # tfds.testing.mock_data's sources only index
        examples = [source[i] for i in range(len(source))]
    size = None if data.image_size is None else tuple(int(v) for v in data.image_size)
    images = []
    for example in progress(examples, len(examples), f"decoding {data.name} {split}", unit="image"):
        image = np.asarray(example[image_key], np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        if size is not None and image.shape[:2] != size:  # variable-sized sets must be resized to stack
            image = resize(image[None], size)[0]
        if images and image.shape != images[0].shape:
            raise ConfigError(f"data.name={data.name!r} has images of different sizes ({images[0].shape} and "
                              f"{image.shape}); set data.image_size=(height, width) to resize them")
        images.append(image)
    labels = np.fromiter((example[label_key] for example in examples), np.int32, len(examples))
    _say(f"Decoded {data.name} {split}: {len(images)} images in {time.time() - start:.1f}s")
    return Split(np.stack(images), labels)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- Batches --------------------------------------------------------------------


def epoch_index(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The example indices of each full batch of an epoch, [steps, batch_size]; the last partial batch is dropped.

    The order depends on (seed, epoch) alone, so a resumed run, or a run
    over more devices or processes, sees the same batches.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // batch_size
    return order[:steps * batch_size].reshape(steps, batch_size)


def eval_index(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every example once, in batches of one fixed shape: (indices, mask), both [steps, batch_size]; padding has mask 0."""
    index = np.arange(-(-n // batch_size) * batch_size).reshape(-1, batch_size)
    mask = index < n
    return np.where(mask, index, 0), mask
