"""TFDS datasets: prepared once (offline from `data.manual_dir`), decoded once into a cache of arrays.

Any TFDS image- or text-classification dataset works by name ('mnist',
'eurosat/rgb', 'imdb_reviews', ...). Preparing imports TensorFlow; reading
prepared array_record files does not, and the decoded arrays are cached
beside the prepared files, so later runs start in seconds.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import tempfile
import time

import ml_collections
import numpy as np

from cnn import workdir
import cnn.data.text as text_lib
from cnn.data.dataset import Dataset, Split
from cnn.data.embedded import EMBEDDED
from cnn.data.images import resize
from cnn.errors import ConfigError
from cnn.progress import progress


def data_dir(data: ml_collections.ConfigDict) -> str:
    """Where prepared TFDS data lives: data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.path.expanduser(data.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _cache_path(data: ml_collections.ConfigDict, split: str, text: bool = False) -> str:
    name = data.name.replace("/", "__").replace(":", "-")
    if text:  # token ids depend on the vocabulary and the length
        name += f"__v{data.vocab_size}_l{data.max_length}"
    return os.path.join(data_dir(data), "cnn_cache", name, f"{split}.npz")


def load_tfds(data: ml_collections.ConfigDict) -> Dataset:
    """Both splits of a TFDS dataset as arrays, from the cache when it holds them."""
    splits = {}
    class_names = None
    if data.cache:
        for text in (False, True):  # which one is known only once read; finding the file says it
            paths = [_cache_path(data, split, text) for split in (data.train_split, data.test_split)]
            if all(os.path.exists(p) for p in paths):
                for split, path in zip((data.train_split, data.test_split), paths):
                    with np.load(path) as f:
                        splits[split] = Split(f["images"], f["labels"])
                        class_names = [str(n) for n in f["class_names"]]
                break
    if len(splits) < 2:
        splits, class_names, text = _read_tfds(data)
        if data.cache:
            for split, arrays in splits.items():
                _write_cache(_cache_path(data, split, text), arrays, class_names)
    return Dataset(data.name, splits[data.train_split], splits[data.test_split], class_names)


def _write_cache(path: str, split: Split, class_names: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with workdir.atomic_path(path) as tmp:
        np.savez(tmp, images=split.images, labels=split.labels, class_names=np.array(class_names))


def _builder(data: ml_collections.ConfigDict):
    import tensorflow_datasets as tfds  # TFDS (and TensorFlow behind it) only for TFDS names

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


def _read_tfds(data: ml_collections.ConfigDict) -> tuple[dict[str, Split], list[str], bool]:
    """Both splits as arrays, the class names, and whether the inputs are text (token ids)."""
    import tensorflow_datasets as tfds

    builder = _builder(data)
    info = builder.info
    keys = info.supervised_keys
    if not keys or len(keys) != 2 or not hasattr(info.features[keys[1]], "num_classes"):
        raise ConfigError(f"data.name={data.name!r} is not an image- or text-classification dataset "
                          "(it has no (input, label) supervised keys)")
    image_key, label_key = keys
    for field, split in (("data.train_split", data.train_split), ("data.test_split", data.test_split)):
        base = split.split("[")[0].split("+")[0]
        if info.splits and base not in info.splits:
            raise ConfigError(f"{field}={split!r} is not a split of {data.name}; it has "
                              f"{', '.join(info.splits.keys())} (slices such as 'train[:90%]' work too)")
    _prepare(builder, data)
    class_names = list(info.features[label_key].names)
    if isinstance(info.features[image_key], tfds.features.Text):
        return _read_text(builder, image_key, label_key, data), class_names, True
    splits = {}
    for split in (data.train_split, data.test_split):
        splits[split] = _decode(builder, split, image_key, label_key, data)
    return splits, class_names, False


def _examples(builder, split: str) -> list[dict]:
    source = builder.as_data_source(split=split)
    try:
        return source.__getitems__(range(len(source)))  # one bulk read: ~2x faster than indexing
    except TypeError:  # tfds.testing.mock_data's sources only index
        return [source[i] for i in range(len(source))]


def _read_text(builder, text_key: str, label_key: str, data: ml_collections.ConfigDict) -> dict[str, Split]:
    """Token ids for both splits, with a vocabulary built from the training split alone.

    Prepared array_record sources give the text as UTF-8 bytes (mock data as
    str); either reads without TensorFlow.
    """
    start = time.time()
    raw = {split: _examples(builder, split) for split in (data.train_split, data.test_split)}
    vocabulary = text_lib.build_vocabulary([e[text_key] for e in raw[data.train_split]], data.vocab_size)
    splits = {}
    for split, examples in raw.items():
        ids = text_lib.encode([e[text_key] for e in examples], vocabulary, data.max_length)
        labels = np.fromiter((e[label_key] for e in examples), np.int32, len(examples))
        splits[split] = Split(ids, labels)
    _say(f"Tokenised {data.name}: {len(vocabulary):,} words from {data.train_split}, "
         f"{sum(map(len, splits.values())):,} texts to {data.max_length} ids in {time.time() - start:.1f}s")
    return splits


def _prepare(builder, data: ml_collections.ConfigDict) -> None:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import downloader

    if builder.is_prepared():
        return
    try:
        import tensorflow  # noqa: F401 - TFDS prepares with it; reading the prepared files needs none
    except ImportError:
        raise ConfigError(f"data.name={data.name!r} is not prepared in {data_dir(data)}, and preparing a TFDS "
                          "dataset needs TensorFlow: pip install -e '.[tfds]', or point data.data_dir (or "
                          "$TFDS_DATA_DIR) at a folder where it is prepared") from None
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
    examples = _examples(builder, split)
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




def input_shape(data: ml_collections.ConfigDict) -> tuple[int, ...]:
    """A TFDS dataset's input shape from its description, without loading or preparing it."""
    info = _builder(data).info
    keys = info.supervised_keys
    if not keys or len(keys) != 2 or not hasattr(info.features[keys[0]], "shape"):
        raise ConfigError(f"data.name={data.name!r} is not an image-classification dataset "
                          "(it has no (image, label) supervised keys)")
    shape = tuple(info.features[keys[0]].shape)
    return (*shape, 1) if len(shape) == 2 else shape
