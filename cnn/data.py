"""Datasets as in-memory arrays, and the batches a training loop reads.

Sources, chosen by `config.data.name`:
- 'digits': the 8x8 handwritten digits that ship inside scikit-learn, so a
  first run needs no network and no preparation;
- 'synthetic_series': seeded one-channel waveforms in four shapes, a time
  series task that needs no download;
- any TFDS image-classification dataset ('mnist', 'fashion_mnist',
  'eurosat/rgb', ...) or text-classification dataset ('imdb_reviews'),
  prepared with TFDS (offline from `data.manual_dir`) and decoded once into a
  cache of arrays beside the prepared files, so later runs skip decoding and
  never import TensorFlow.

Images stay uint8 until `preprocess`, which runs inside the compiled step;
token ids (int32) and series (float32) pass through it unchanged.
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

EMBEDDED = ("digits", "synthetic_series")
# Token ids 0 and 1 of a text vocabulary: padding and out-of-vocabulary words.
PAD, OOV = 0, 1


@dataclasses.dataclass
class Split:
    # The inputs, named for the common case: uint8 images (N, height, width,
    # channels), int32 token ids (N, length) or float32 series (N, length, channels).
    images: np.ndarray
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
    """Loads both splits of `data.name` into memory, resized to `data.image_size` and converted to
    `data.channels` where those are set."""
    if data.name == "digits":
        dataset = _load_digits()
    elif data.name == "synthetic_series":
        dataset = _load_synthetic_series(data.get("max_length") or 128)
    else:
        dataset = _load_tfds(data)
    is_image = dataset.train.images.dtype == np.uint8 and dataset.train.images.ndim == 4
    for field in ("image_size", "channels"):
        if data.get(field) is not None and not is_image:
            raise ConfigError(f"data.{field}={data[field]!r} applies to images, but {data.name} holds sequences "
                              f"shaped {dataset.input_shape}; leave data.{field}=None")
    for split in (dataset.train, dataset.test):
        if data.image_size is not None:
            split.images = resize(split.images, tuple(int(v) for v in data.image_size))
        if data.get("channels") is not None:
            split.images = to_channels(split.images, data.channels)
    if data.mean is not None and len(data.mean) not in (1, dataset.input_shape[-1]):
        raise ConfigError(f"data.mean={tuple(data.mean)!r} has {len(data.mean)} values but the images have "
                          f"{dataset.input_shape[-1]} channels")
    return dataset


def preprocess(images: jax.Array, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
               ) -> jax.Array:
    """uint8 images to float32 in [0, 1], then (x - mean) / std if given (data.mean, data.std).

    Other inputs (int32 token ids, float32 series) are returned unchanged, so
    the same compiled step trains on text and time series.
    """
    if images.dtype != jnp.uint8:
        return images
    x = images.astype(jnp.float32) / 255.0
    if mean is not None:
        x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x


def augment(images: jax.Array, rng: jax.Array, crop_padding: int = 0, flip: bool = False,
            pad_mode: str = "constant") -> jax.Array:
    """Random crops and horizontal flips of a uint8 NHWC batch, a different draw per example.

    Each image is padded by `crop_padding` pixels on every side (zeros for
    pad_mode='constant', mirrored for 'reflect') and cropped back to its size
    at a random offset; with `flip`, half of the images, at random, are
    mirrored left to right. Pure and shape-preserving, so it runs inside the
    compiled train step (on the device, no host work), and a given `rng`
    always gives the same batch. The arguments other than the arrays are
    static: data.crop_padding, data.flip and data.pad_mode.
    """
    if images.ndim != 4:
        return images  # token ids and series are not images
    n, height, width, channels = images.shape
    crop_rng, flip_rng = jax.random.split(rng)
    if crop_padding:
        p = crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode=pad_mode)
        offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * p + 1)
        images = jax.vmap(lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (height, width, channels))
                          )(padded, offsets)
    if flip:
        mirror = jax.random.bernoulli(flip_rng, 0.5, (n,))
        images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1, :], images)
    return images


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 images to `channels` channels: RGB to grey by luma (ITU-R 601), grey to RGB by repeating."""
    have = images.shape[-1]
    if have == channels:
        return images
    if have == 3 and channels == 1:
        grey = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None]
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    raise ConfigError(f"data.channels={channels!r}: cannot convert images with {have} channels; use 1 (grey), "
                      f"3 (RGB) or None (keep {have})")


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


def _load_synthetic_series(length: int, train_size: int = 3000, test_size: int = 1000) -> Dataset:
    """Noisy sine, square, sawtooth and triangle waves (N, length, 1), classified by shape.

    Frequency (1 to 6 cycles), phase, amplitude, offset and noise are drawn per
    example from a fixed seed, so the set is the same everywhere and needs no
    download.
    """
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


# --- Text -----------------------------------------------------------------------

_MARKUP = re.compile(r"<[^>]+>")
_WORD = re.compile(r"[a-z0-9']+")


def words(text: str | bytes) -> list[str]:
    """Lowercase words, with HTML tags such as imdb_reviews' <br /> removed."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return _WORD.findall(_MARKUP.sub(" ", text.lower()))


def build_vocabulary(texts: list[str | bytes], size: int) -> list[str]:
    """The `size - 2` most frequent words (ties by first appearance), after the pad and OOV ids."""
    import collections

    counts = collections.Counter(w for text in texts for w in words(text))
    return ["<pad>", "<oov>", *(w for w, _ in counts.most_common(size - 2))]


def encode(texts: list[str | bytes], vocabulary: list[str], max_length: int) -> np.ndarray:
    """int32 ids (N, max_length): the first max_length words, padded with PAD at the end."""
    index = {w: i for i, w in enumerate(vocabulary)}
    ids = np.full((len(texts), max_length), PAD, np.int32)
    for row, text in enumerate(texts):
        tokens = [index.get(w, OOV) for w in words(text)[:max_length]]
        ids[row, :len(tokens)] = tokens
    return ids


# --- TFDS ---------------------------------------------------------------------


def data_dir(data: ml_collections.ConfigDict) -> str:
    """Where prepared TFDS data lives: data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.path.expanduser(data.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _cache_path(data: ml_collections.ConfigDict, split: str, text: bool = False) -> str:
    name = data.name.replace("/", "__").replace(":", "-")
    if text:  # token ids depend on the vocabulary and the length
        name += f"__v{data.vocab_size}_l{data.max_length}"
    return os.path.join(data_dir(data), "cnn_cache", name, f"{split}.npz")


def _load_tfds(data: ml_collections.ConfigDict) -> Dataset:
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
    vocabulary = build_vocabulary([e[text_key] for e in raw[data.train_split]], data.vocab_size)
    splits = {}
    for split, examples in raw.items():
        ids = encode([e[text_key] for e in examples], vocabulary, data.max_length)
        labels = np.fromiter((e[label_key] for e in examples), np.int32, len(examples))
        splits[split] = Split(ids, labels)
    _say(f"Tokenised {data.name}: {len(vocabulary):,} words from {data.train_split}, "
         f"{sum(map(len, splits.values())):,} texts to {data.max_length} ids in {time.time() - start:.1f}s")
    return splits


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
