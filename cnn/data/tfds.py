"""TFDS datasets: prepared once (offline from `data.manual_dir`), decoded once into a cache of arrays.

Any TFDS image- or text-classification dataset works by name ('mnist',
'eurosat/rgb', 'imdb_reviews', ...). Preparing imports TensorFlow; reading
prepared array_record files does not, and the decoded arrays are cached
beside the prepared files (cnn/data/cache.py), so later runs start in seconds.
MNIST, Fashion-MNIST and KMNIST need none of this when data.manual_dir holds
their original archives: cnn/data/idx.py reads those with numpy.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator

import ml_collections
import numpy as np

import cnn.data.cache as cache_lib
import cnn.data.stream as stream
import cnn.data.text as text_lib
from cnn.data.dataset import Dataset, Split
from cnn.data.images import resize
from cnn.data_sources import IDX_SETS, SOURCES
from cnn.errors import ConfigError
from cnn.progress import Progress


def data_dir(data: ml_collections.ConfigDict) -> str:
    """Where prepared TFDS data lives: data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.path.expanduser(data.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _length(data: ml_collections.ConfigDict) -> int:
    return int(data.get("max_length") or text_lib.DEFAULT_LENGTH)


def _cache_entry(data: ml_collections.ConfigDict, split: str, text: bool) -> tuple[str, dict]:
    """The cache folder of one split (beside the prepared data) and the key it must have been built from."""
    name = data.name.replace("/", "__").replace(":", "-")
    key = {"source": "tfds", "name": data.name, "split": split}
    if text:  # token ids depend on the vocabulary (of the training split) and the length
        name += f"__v{data.vocab_size}_l{_length(data)}"
        key.update(vocab_size=int(data.vocab_size), max_length=_length(data), vocabulary_from=data.train_split)
    elif data.get("image_size") is not None:  # variable-sized sets are resized while decoding
        size = tuple(int(v) for v in data.image_size)
        name += f"__{size[0]}x{size[1]}"
        key["image_size"] = size
    return os.path.join(data_dir(data), "cnn_cache", name, split.replace(os.sep, "__")), key


def load_tfds(data: ml_collections.ConfigDict, seed: int = 0) -> Dataset:
    """Both splits of a TFDS dataset as arrays, from the cache when it holds them (`seed` is unused: TFDS sets
    come with their test split).

    An image split larger than data.max_memory_gb stays in its cache entry
    and is read from disk by rows (cnn/data/stream.py), as an image folder is;
    token ids are always loaded.
    """
    names = (data.train_split, data.test_split)
    budget, why = stream.memory_budget(data.get("max_memory_gb"))
    if data.cache:
        for text in (False, True):  # which one is known only once read; finding the entries says it
            entries = [_cache_entry(data, split, text) for split in names]
            if not all(os.path.isdir(folder) for folder, _ in entries):
                continue
            found = [cache_lib.read(folder, key, None if text else budget) for folder, key in entries]
            if all(found):
                if not text:
                    for entry, (folder, _) in zip(found, entries):
                        cache_lib.report_path(entry, folder, why)
                splits = [Split(e.arrays["images"], e.arrays["labels"]) for e in found]
                return Dataset(data.name, *splits, list(found[0].info["class_names"]))
    splits, class_names = _read_tfds(data, budget, why)
    return Dataset(data.name, splits[data.train_split], splits[data.test_split], class_names)


def _verbose() -> bool:
    """Whether the command line asked for logs (--verbosity); a notebook, which has no flags, is quiet."""
    from absl import flags

    return flags.FLAGS.is_parsed() and bool(flags.FLAGS["verbosity"].present)


@contextlib.contextmanager
def _quiet_tensorflow() -> Iterator[None]:
    """TFDS's absl warnings and TensorFlow's C++ logs tell a user nothing to act on: hidden unless --verbosity
    asks for them."""
    from absl import logging

    if _verbose():
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # for TensorFlow's logs once it has started
    before = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(before)


def tfds_builder(data: ml_collections.ConfigDict):
    """TFDS's builder of data.name: its description (features, class names, archive checksums) needs no
    TensorFlow and no preparation."""
    import tensorflow_datasets as tfds  # TFDS (and TensorFlow behind it) only for TFDS names

    try:
        return tfds.builder(data.name, data_dir=data_dir(data))
    except tfds.core.registered.DatasetNotFoundError:
        # Not community datasets: listing them imports TensorFlow and asks Google Cloud for credentials.
        known = [*SOURCES, *tfds.list_builders(with_community_datasets=False)]
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


@_quiet_tensorflow()
def _read_tfds(data: ml_collections.ConfigDict, budget: int, why: str) -> tuple[dict[str, Split], list[str]]:
    """Both splits (decoded into the cache where data.cache) and the class names."""
    import tensorflow_datasets as tfds

    builder = tfds_builder(data)
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
        splits = _read_text(builder, image_key, label_key, data)
        for split, arrays in splits.items() if data.cache else ():
            entry = cache_lib.Entry({"images": arrays.images, "labels": arrays.labels}, {"class_names": class_names})
            cache_lib.write(*_cache_entry(data, split, True), entry)
        return splits, class_names
    splits = {}
    for split in (data.train_split, data.test_split):
        folder, key = _cache_entry(data, split, False) if data.cache else (None, None)
        entry, _ = cache_lib.cached_within(
            folder, key, lambda tmp: _decode(builder, split, image_key, label_key, data, tmp, class_names), budget, why)
        splits[split] = Split(entry.arrays["images"], entry.arrays["labels"])
    return splits, class_names


def _examples(builder, split: str) -> list[dict]:
    source = builder.as_data_source(split=split)
    return _read_range(source, 0, len(source))


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
        ids = text_lib.encode([e[text_key] for e in examples], vocabulary, _length(data))
        labels = np.fromiter((e[label_key] for e in examples), np.int32, len(examples))
        splits[split] = Split(ids, labels)
    _say(f"Tokenised {data.name}: {len(vocabulary):,} words from {data.train_split}, "
         f"{sum(map(len, splits.values())):,} texts to {_length(data)} ids in {time.time() - start:.1f}s")
    return splits


def _prepare(builder, data: ml_collections.ConfigDict) -> None:
    import tensorflow_datasets as tfds

    if builder.is_prepared():
        return
    if importlib.util.find_spec("tensorflow") is None:  # TFDS prepares with it; reading the files needs none
        archives = ("; or set data.manual_dir to a folder holding its four original IDX archives "
                    "(train-images-idx3-ubyte.gz, ...), which cnn reads without TensorFlow"
                    if data.name in IDX_SETS and not data.manual_dir else "")
        raise ConfigError(f"data.name={data.name!r} is not prepared in {data_dir(data)}, and preparing a TFDS "
                          "dataset needs TensorFlow: pip install -e '.[tfds]', or point data.data_dir (or "
                          f"$TFDS_DATA_DIR) at a folder where it is prepared{archives}")
    _say(f"Preparing {data.name} in {builder.data_dir} (once; TFDS needs TensorFlow for this step)...")
    if not sys.stderr.isatty():
        tfds.disable_progress_bar()  # its bars are one line per update in a log file
    if data.manual_dir:
        check_manual_files(builder, data)
    _import_tensorflow()
    start = time.time()
    # TFDS unpacks archives into a folder shared by all datasets and reuses
    # files by name, so MNIST and Fashion-MNIST (same file names) would mix:
    # give each preparation its own.
    try:
        with _downloads_fail_fast(), tempfile.TemporaryDirectory(prefix="cnn-extract-") as extract_dir:
            config = tfds.download.DownloadConfig(manual_dir=data.manual_dir, extract_dir=extract_dir)
            builder.download_and_prepare(download_config=config, file_format="array_record")
    except Exception as e:  # TFDS raises many types here; all mean "could not get the files"
        where = (f"the files in data.manual_dir={data.manual_dir!r} did not work ({type(e).__name__}: "
                 f"{str(e).splitlines()[0][:300]})" if data.manual_dir
                 else f"it could not be downloaded ({type(e).__name__})")
        raise ConfigError(
            f"data.name={data.name!r} is not prepared in {data_dir(data)} and {where}. Offline, pass "
            "--config.data.manual_dir=FOLDER, a folder holding the dataset's original archive files "
            "(for MNIST, its four .gz files), or point --config.data.data_dir (or $TFDS_DATA_DIR) at a "
            "folder where it is already prepared.") from None
    _say(f"Prepared {data.name} in {time.time() - start:.1f}s")


DOWNLOAD_TIMEOUT_S = (10.0, 60.0)  # (connect, silence between reads): a dead network, not a slow one


@contextlib.contextmanager
def _downloads_fail_fast(timeout: tuple[float, float] = DOWNLOAD_TIMEOUT_S) -> Iterator[None]:
    """TFDS retries a failing download 10 times with backoff (~200 s offline) and gives `requests` no
    timeout, so a network that drops packets instead of refusing hangs forever: one retry and a timeout."""
    from tensorflow_datasets.core.download import downloader

    retries, open_url = downloader.MAX_RETRIES, downloader._open_url
    downloader.MAX_RETRIES = 1
    downloader._open_url = lambda url, **kwargs: open_url(url, **{"timeout": timeout, **kwargs})
    try:
        yield
    finally:
        downloader.MAX_RETRIES, downloader._open_url = retries, open_url


def check_manual_files(builder, data: ml_collections.ConfigDict) -> None:
    """Names a file in data.manual_dir that TFDS would reject by its checksum (a copy cut short, another
    dataset's file), before TensorFlow loads and its stack trace would."""
    for info in (builder.url_infos or {}).values():
        path = os.path.join(data.manual_dir, info.filename or "")
        if not info.filename or not os.path.isfile(path):
            continue  # TFDS downloads what is missing (or says it cannot)
        size = os.path.getsize(path)
        if size == int(info.size) and _sha256(path) == info.checksum:
            continue
        found = f"{size:,} bytes" if size != int(info.size) else "the right size but other bytes"
        raise ConfigError(f"data.manual_dir: {path} is not {data.name}'s {info.filename} ({found}; expected "
                          f"{int(info.size):,} bytes with SHA-256 {info.checksum}); copy it again, or remove it")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _decode(builder, split: str, image_key: str, label_key: str, data: ml_collections.ConfigDict, tmp: str | None,
            class_names: list[str]) -> cache_lib.Entry:
    """Decodes one split, a piece at a time, into tmp/images.npy (or, with tmp None, into memory).

    Prepared array_record data reads without TensorFlow; no more than one
    piece of decoded images is held at once, so a split larger than memory
    decodes too.
    """
    start = time.time()
    source = builder.as_data_source(split=split)
    count = len(source)
    size = None if data.image_size is None else tuple(int(v) for v in data.image_size)
    images, labels = None, np.zeros(count, np.int32)
    bar = Progress(count, f"decoding {data.name} {split}", unit="image")
    for begin in range(0, count, DECODE_PIECE):
        examples = _read_range(source, begin, min(count, begin + DECODE_PIECE))
        piece = np.stack([_image(e[image_key], size, data) for e in examples]) if examples else None
        if images is None:
            shape = (count, *(piece.shape[1:] if piece is not None else (1, 1, 1)))
            images = np.zeros(shape, np.uint8) if tmp is None else stream.ArrayWriter(
                os.path.join(tmp, "images.npy"), shape, np.uint8)
        if piece is not None and piece.shape[1:] != images.shape[1:]:
            raise ConfigError(f"data.name={data.name!r} has images of different sizes ({images.shape[1:]} and "
                              f"{piece.shape[1:]}); set data.image_size=(height, width) to resize them")
        if isinstance(images, np.ndarray):
            images[begin:begin + len(examples)] = piece
        else:
            images.write(begin, piece)
        labels[begin:begin + len(examples)] = [e[label_key] for e in examples]
        bar.update(len(examples))
    bar.close()
    if not isinstance(images, np.ndarray):
        images.close()
        images = stream.DiskArray(images.path)
    _say(f"Decoded {data.name} {split}: {count} images in {time.time() - start:.1f}s")
    return cache_lib.Entry({"images": images, "labels": labels}, {"class_names": class_names})


DECODE_PIECE = 4096  # examples read and decoded at a time


def _read_range(source, begin: int, end: int) -> list[dict]:
    try:
        return source.__getitems__(range(begin, end))  # one bulk read: ~2x faster than indexing
    except TypeError:  # tfds.testing.mock_data's sources only index
        return [source[i] for i in range(begin, end)]


def _image(value, size: tuple[int, int] | None, data: ml_collections.ConfigDict) -> np.ndarray:
    image = np.asarray(value, np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    if size is not None and image.shape[:2] != size:  # variable-sized sets must be resized to stack
        image = resize(image[None], size)[0]
    return image


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _import_tensorflow() -> None:
    """Imports TensorFlow, its start-up lines (oneDNN, CPU features) kept off the terminal unless --verbosity.

    Its C++ libraries write them straight to file descriptor 2 as they load,
    and TF_CPP_MIN_LOG_LEVEL does not stop them (TF 2.21), so stderr points
    at a temporary file meanwhile; that file is shown if the import fails.
    """
    if "tensorflow" in sys.modules or _verbose():
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@_quiet_tensorflow()
def input_shape(data: ml_collections.ConfigDict) -> tuple[int, ...]:
    """A TFDS dataset's input shape from its description, without loading or preparing it."""
    info = tfds_builder(data).info
    keys = info.supervised_keys
    if not keys or len(keys) != 2 or not hasattr(info.features[keys[0]], "shape"):
        raise ConfigError(f"data.name={data.name!r} is not an image-classification dataset "
                          "(it has no (image, label) supervised keys)")
    shape = tuple(info.features[keys[0]].shape)
    return (*shape, 1) if len(shape) == 2 else shape
