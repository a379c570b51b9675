"""Your own images or texts sorted into class folders: ROOT/<class>/<files>, one folder per class.

Class names are the folder names, sorted. A test folder (data.test_path) may
lack classes but never add one; without it, data.test_fraction of the
training files are held out, stratified by class. Examples are ordered by
their path below the class folder, then by class, so files numbered as
another dataset's index keep its order. Files of another kind (README.txt,
.DS_Store) are ignored; files that fail to decode are skipped and returned
on `Dataset.skipped`, which training writes to WORKDIR/skipped_files.txt
(data.strict=True refuses them instead). Decoding runs once, over every
core, and is cached under a key of every file's path, size and modification
time: a later run starts in seconds and notices an added or changed file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import ml_collections
import numpy as np

import cnn.data.cache as cache_lib
import cnn.data.stream as stream
import cnn.data.text as text_lib
from cnn.data.dataset import Dataset, Split
from cnn.data.images import GREY_MODES, to_mode
from cnn.data.split import hold_out
from cnn.errors import ConfigError
from cnn.progress import Progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # what Pillow reads
TEXT_EXTENSIONS = (".txt",)
CHUNK = 256  # files per task: large enough to amortise the hand-off, small enough for a live progress bar


@dataclasses.dataclass
class Listing:
    """The files of one folder of class folders, in reading order."""

    root: str
    field: str  # the config field that named it
    kind: str  # 'image' or 'text file'
    folders: list[str]  # its class folders, sorted
    names: list[str]  # the class names `labels` index: the training folders
    paths: list[str]
    labels: np.ndarray  # int32 indices into the training class names
    ignored: list[str]  # files of another kind
    digest: str  # over every file's path, size and modification time: the cache key


def list_classes(root: str, field: str, kind: str, extensions: tuple[str, ...],
                 class_names: list[str] | None = None) -> Listing:
    """The files of `kind` under ROOT/<class>/; `class_names` (the training classes) for a test folder."""
    if not os.path.exists(root):
        raise ConfigError(f"{field}={root!r} does not exist; point it at a folder of class folders, "
                          f"ROOT/<class>/<{kind}s>")
    if not os.path.isdir(root):
        raise ConfigError(f"{field}={root!r} is a file; this source reads a folder of class folders, "
                          f"ROOT/<class>/<{kind}s>")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise ConfigError(f"{field}={root!r} has no class folders; put each class's {kind}s in a folder named "
                          f"for the class: {os.path.join(root, '<class>', '<files>')}")
    if class_names is None and len(folders) < 2:
        raise ConfigError(f"{field}={root!r} has one class folder ({folders[0]!r}); a classifier needs two or "
                          "more, one folder per class")
    if class_names is not None and set(folders) - set(class_names):
        unknown = sorted(set(folders) - set(class_names))
        raise ConfigError(f"{field}={root!r} has class folders that data.path lacks: "
                          f"{', '.join(map(repr, unknown[:5]))}; the training classes are "
                          f"{', '.join(map(repr, class_names[:10]))}{', ...' if len(class_names) > 10 else ''}")
    index = {name: i for i, name in enumerate(class_names or folders)}
    found, ignored = [], []
    for folder in folders:
        for relative, size, mtime in _walk(os.path.join(root, folder), ""):
            if relative.lower().endswith(extensions):
                found.append((relative, index[folder], folder, size, mtime))
            else:
                ignored.append(folder + os.sep + relative)
    found.sort(key=lambda f: (f[0], f[1]))
    stamps = "".join(f"{folder}/{relative}\0{size}\0{mtime}\n" for relative, _, folder, size, mtime in found)
    top = os.path.abspath(root) + os.sep
    return Listing(root=root, field=field, kind=kind, folders=folders, names=list(class_names or folders),
                   paths=[top + folder + os.sep + relative for relative, _, folder, _, _ in found],
                   labels=np.array([f[1] for f in found], np.int32), ignored=ignored,
                   digest=hashlib.blake2b(stamps.encode(), digest_size=16).hexdigest())


def _walk(folder: str, prefix: str) -> list[tuple[str, int, int]]:
    """(path below the class folder, size, modification time) of every file, subfolders included; hidden
    folders are skipped. Plain string joins: this runs once per file at every start."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    out = []
    for entry in entries:
        try:
            if entry.is_dir():
                if not entry.name.startswith("."):
                    out += _walk(entry.path, prefix + entry.name + os.sep)
            else:
                stat = entry.stat()
                out.append((prefix + entry.name, stat.st_size, stat.st_mtime_ns))
        except OSError:  # vanished or unreadable: nothing to decode
            continue
    return out


def workers() -> int:
    """Threads to decode with: one per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_image(path: str, size: tuple[int, int] | None, mode: str | None) -> tuple[np.ndarray | None, str]:
    """(uint8 (height, width, channels), '') or (None, why it cannot be read)."""
    from PIL import Image, ImageOps

    try:
        if os.path.getsize(path) == 0:
            return None, "empty file"
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)  # upright, as a viewer (and cnn.predict) shows it
            image = to_mode(image, mode or ("L" if image.mode in GREY_MODES else "RGB"))
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BILINEAR)
            array = np.asarray(image, np.uint8)
    except Exception as e:  # noqa: BLE001 - decoders raise many types on a damaged file; each means "unreadable"
        detail = str(e).splitlines()[0][:120] if str(e) else ""
        if type(e).__name__ == "UnidentifiedImageError":
            return None, "not an image Pillow can read"
        return None, f"could not be decoded ({type(e).__name__}{': ' + detail if detail else ''})"
    return (array[..., None] if array.ndim == 2 else array), ""


def _read_text(path: str) -> tuple[bytes | None, str]:
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as e:
        return None, f"could not be read ({e.strerror})"
    return (content, "") if content.strip() else (None, "empty file")


def _read_chunk(read: Callable[[str], tuple], paths: list[str]) -> list[tuple]:
    return [read(path) for path in paths]


def _pool(count: int) -> Executor:
    """Processes forked from this one where the platform forks (decoding small files is mostly Python, which
    threads would serialise); threads elsewhere. The children only decode: they never touch JAX."""
    if count > 1 and "fork" in multiprocessing.get_all_start_methods():
        return ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork"))
    return ThreadPoolExecutor(count)


def _read_all(listing: Listing, read: Callable[[str], tuple], strict: bool,
              sink: Callable[[int, list], None] | None = None) -> tuple[list, list[tuple[str, str]]]:
    """Every file of `listing` read by `read` over every core, behind a progress bar: the results (None where
    unreadable), and (path, reason) for each unreadable file. With `sink`, each chunk of results goes to
    `sink(start, values)` as it arrives instead, and only True marks the readable ones."""
    paths = listing.paths
    results, skipped = [None] * len(paths), []
    bar = Progress(len(paths), f"reading {listing.root}", unit="file")
    pool = _pool(min(workers(), -(-len(paths) // CHUNK)))
    try:
        with warnings.catch_warnings():  # JAX warns at any fork; these children never run JAX
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            chunks = pool.map(functools.partial(_read_chunk, read),
                              [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)])
        start = 0
        for chunk in chunks:
            for i, (value, reason) in enumerate(chunk, start):
                if reason and strict:
                    raise ConfigError(f"{paths[i]}: {reason}; remove or replace the file, or set data.strict=False "
                                      "to skip unreadable files (they are then listed in WORKDIR/skipped_files.txt)")
                if reason:
                    skipped.append((paths[i], reason))
                results[i] = value if sink is None or value is None else True
            if sink is not None:
                sink(start, [value for value, _ in chunk])
            start += len(chunk)
            bar.update(len(chunk))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return results, skipped


def _keep_readable(listing: Listing, values: list, skipped: list[tuple[str, str]]) -> tuple[list, np.ndarray, list]:
    """The readable values, their labels and paths; a class folder with none of them is an error."""
    keep = [i for i, v in enumerate(values) if v is not None]
    labels = listing.labels[keep]
    present = set(labels.tolist())
    for folder in listing.folders:
        if listing.names.index(folder) in present:
            continue
        inside = os.path.join(os.path.abspath(listing.root), folder, "")
        bad = [(p, r) for p, r in skipped if p.startswith(inside)]
        detail = f"{len(bad)} could not be read, e.g. {bad[0][0]}: {bad[0][1]}" if bad else f"no {listing.kind}s in it"
        other = [f for f in listing.ignored if f.startswith(folder + os.sep)]
        detail += f"; {len(other)} other files ignored, e.g. {other[0]}" if other else ""
        raise ConfigError(f"{listing.field}={listing.root!r}: the class folder {folder!r} has no readable "
                          f"{listing.kind} ({detail}); add some, or remove the folder")
    return [values[i] for i in keep], labels, [listing.paths[i] for i in keep]


def _settings(data: ml_collections.ConfigDict) -> tuple[tuple[int, int] | None, int | None]:
    size = data.get("image_size")
    return (None if size is None else (int(size[0]), int(size[1]))), data.get("channels")


def _build_images(train: Listing, test: Listing | None, data: ml_collections.ConfigDict, tmp: str | None
                  ) -> cache_lib.Entry:
    """Decodes both folders into one uint8 array each, of one size and one channel count: written into
    preallocated .npy files in `tmp` as the files are decoded (in memory when `tmp` is None), so the whole
    decoded set is never held at once."""
    size, channels = _settings(data)
    mode = {1: "L", 3: "RGB"}.get(channels)
    decode = functools.partial(_decode_image, size=size, mode=mode)
    arrays, skipped, shape = {}, [], {}  # shape: the first image's (height, width) and its path
    for name, listing in (("train", train), ("test", test)):
        if listing is None:
            continue
        rows = _ImageRows(tmp, f"{name}_images", len(listing.paths), listing.paths, shape)
        marks, bad = _read_all(listing, decode, bool(data.get("strict")), sink=rows.add)
        skipped += bad
        _, labels, _ = _keep_readable(listing, marks, bad)
        arrays[f"{name}_images"] = rows.keep(np.flatnonzero([m is not None for m in marks]))
        arrays[f"{name}_labels"] = labels
    if any(a.shape[-1] == 3 for n, a in arrays.items() if n.endswith("_images")):  # mixed grey and colour: all RGB
        for name in [n for n, a in arrays.items() if n.endswith("_images") and a.shape[-1] == 1]:
            arrays[name] = _copy_rows(arrays[name], np.arange(len(arrays[name])), 3, tmp, name)
    return cache_lib.Entry(arrays, {"skipped": skipped})


class _ImageRows:
    """The decoded images of one folder, each written to its row as it arrives: the array is allocated at the
    first readable image (its size, and its channel count until a colour image widens it to 3)."""

    def __init__(self, tmp: str | None, name: str, count: int, paths: list[str], shape: dict):
        self.tmp, self.name, self.count, self.paths, self.shape = tmp, name, count, paths, shape
        self.array = None  # a DiskArray-to-be (stream.ArrayWriter) or, without tmp, an ndarray
        self.channels = None

    def add(self, start: int, values: list) -> None:
        for i, image in enumerate(values, start):
            if image is not None:
                self._check(image, i)
        present = [(i, image) for i, image in enumerate(values, start) if image is not None]
        for i, image in present:
            if self.array is None:
                self.channels = image.shape[-1]
                self.array = _rows_target(self.tmp, self.name + ".part", (self.count, *image.shape[:2],
                                                                          self.channels))
            elif image.shape[-1] > self.channels:
                self.array = _widen(self.array, self.tmp, self.name)
                self.channels = 3
            _put(self.array, i, np.repeat(image, 3, axis=-1) if image.shape[-1] < self.channels else image)

    def _check(self, image: np.ndarray, i: int) -> None:
        if "size" not in self.shape:
            self.shape.update(size=image.shape[:2], path=self.paths[i], image=image)
        elif image.shape[:2] != self.shape["size"]:
            _check_sizes([(self.shape["image"], self.shape["path"]), (image, self.paths[i])])

    def keep(self, readable: np.ndarray):
        """The finished array of the readable rows: the file itself when every file was readable."""
        if self.array is None:
            return np.zeros((0, 1, 1, 1), np.uint8)  # no readable file: _keep_readable has refused already
        array = _finish(self.array)
        if len(readable) == self.count:
            return _rename(array, self.tmp, self.name)
        return _copy_rows(array, readable, self.channels, self.tmp, self.name)


def _rows_target(tmp: str | None, name: str, shape: tuple[int, ...]):
    return np.zeros(shape, np.uint8) if tmp is None else stream.ArrayWriter(os.path.join(tmp, f"{name}.npy"), shape,
                                                                            np.uint8)


def _put(target, i: int, image: np.ndarray) -> None:
    if isinstance(target, np.ndarray):
        target[i] = image
    else:
        target.write(i, image[None])


def _finish(target):
    if isinstance(target, np.ndarray):
        return target
    target.close()
    return stream.DiskArray(target.path)


def _widen(target, tmp: str | None, name: str):
    """A grey target as RGB (each row's channel repeated), to take the colour image that just arrived."""
    array = _finish(target)
    wide = _rows_target(tmp, name + ".wide", (*array.shape[:3], 3))
    for start, rows in _pieces(array):
        _put_rows(wide, start, np.repeat(rows, 3, axis=-1))
    if isinstance(array, stream.DiskArray):
        array.close()
        wide.close()
        os.replace(wide.path, array.path)
        return stream.ArrayWriter.reopen(array.path)
    return wide


def _copy_rows(array, rows: np.ndarray, channels: int, tmp: str | None, name: str):
    """`array[rows]` with `channels` channels (grey repeated to RGB), into a new array or file named `name`."""
    source = stream.select(array, rows)
    out = _rows_target(tmp, name + ".copy", (len(rows), *array.shape[1:3], channels))
    for start, piece in _pieces(source):
        _put_rows(out, start, np.repeat(piece, channels, axis=-1) if piece.shape[-1] < channels else piece)
    if isinstance(array, stream.DiskArray):
        array.close()
        os.remove(array.path)
    return _rename(_finish(out), tmp, name)


def _pieces(array):
    if isinstance(array, stream.DiskArray):
        yield from array.pieces()
    else:
        yield 0, array


def _put_rows(target, start: int, rows: np.ndarray) -> None:
    if isinstance(target, np.ndarray):
        target[start:start + len(rows)] = rows
    else:
        target.write(start, rows)


def _rename(array, tmp: str | None, name: str):
    """A finished file in `tmp` under its entry name (NAME.npy), where the cache's manifest expects it."""
    if not isinstance(array, stream.DiskArray):
        return array
    array.close()
    final = os.path.join(tmp, f"{name}.npy")
    os.replace(array.path, final)
    return stream.DiskArray(final)


def _check_sizes(images: list[tuple[np.ndarray, str]]) -> None:
    """Images of different sizes cannot be stacked: name two of them, and the fix."""
    (first, first_path), height_width = images[0], images[0][0].shape[:2]
    for image, path in images:
        if image.shape[:2] != height_width:
            raise ConfigError(f"images differ in size: {first_path} is {first.shape[1]}x{first.shape[0]} and {path} "
                              f"is {image.shape[1]}x{image.shape[0]}; set data.image_size=(height, width) to resize "
                              "them all")


def _build_texts(train: Listing, test: Listing | None, data: ml_collections.ConfigDict, seed: int,
                 length: int) -> cache_lib.Entry:
    """Reads both folders, holds out the test split if there is no test folder, then tokenises with a
    vocabulary of the training texts alone."""
    parts, skipped = {}, []
    for name, listing in (("train", train), ("test", test)):
        if listing is not None:
            values, bad = _read_all(listing, _read_text, bool(data.get("strict")))
            skipped += bad
            texts, labels, _ = _keep_readable(listing, values, bad)
            parts[name] = (texts, labels)
    if test is None:
        texts, labels = parts["train"]
        rows = hold_out(labels, float(data.test_fraction), seed)
        parts = {name: ([texts[i] for i in index], labels[index]) for name, index in zip(("train", "test"), rows)}
    vocabulary = text_lib.build_vocabulary(parts["train"][0], int(data.vocab_size))
    arrays = {}
    for name, (texts, labels) in parts.items():
        arrays[f"{name}_images"] = text_lib.encode(texts, vocabulary, length)
        arrays[f"{name}_labels"] = labels
    return cache_lib.Entry(arrays, {"skipped": skipped, "vocabulary": len(vocabulary)})


def load_folders(data: ml_collections.ConfigDict, seed: int) -> Dataset:
    """data.name 'image_folder' or 'text_folder': both splits as arrays, decoded once and then cached."""
    text = data.name == "text_folder"
    kind, extensions = ("text file", TEXT_EXTENSIONS) if text else ("image", IMAGE_EXTENSIONS)
    start = time.time()
    train = list_classes(data.path, "data.path", kind, extensions)
    test = list_classes(data.test_path, "data.test_path", kind, extensions, train.folders) \
        if data.get("test_path") else None
    size, channels = _settings(data)
    length = data.get("max_length") or text_lib.DEFAULT_LENGTH
    settings = ({"vocab_size": int(data.vocab_size), "max_length": int(length)} if text else
                {"image_size": size, "channels": channels})
    if text and test is None:  # the vocabulary depends on which texts are held out
        settings.update(seed=int(seed), test_fraction=float(data.test_fraction))
    settings["test_path"] = test and os.path.realpath(test.root)
    key = {**settings, "train": train.digest, "test": test and test.digest}
    folder = cache_lib.entry_folder(data, data.name, data.path, settings) if data.cache else None
    if text:
        entry, hit = cache_lib.cached(folder, key, lambda: _build_texts(train, test, data, seed, length))
    else:
        entry, hit = cache_lib.cached_within(folder, key, lambda tmp: _build_images(train, test, data, tmp),
                                             *stream.memory_budget(data.get("max_memory_gb")))
    skipped = [tuple(s) for s in entry.info.get("skipped", [])]
    if data.get("strict") and skipped:  # cached by a run that skipped them
        raise ConfigError(f"{skipped[0][0]}: {skipped[0][1]}; remove or replace the file, or set data.strict=False")
    a = entry.arrays
    if "test_images" in a:
        splits = Split(a["train_images"], a["train_labels"]), Split(a["test_images"], a["test_labels"])
    else:
        rows = hold_out(a["train_labels"], float(data.test_fraction), seed)
        splits = tuple(Split(stream.select(a["train_images"], i), a["train_labels"][i]) for i in rows)
    _report(train, test, splits, hit, folder, time.time() - start)
    return Dataset(data.name, *splits, list(train.folders), skipped=skipped)


def _report(train: Listing, test: Listing | None, splits: tuple[Split, Split], hit: bool, folder: str | None,
            seconds: float) -> None:
    """One line on what was read. Unreadable files are not counted here: training announces them once, with the
    file that lists them (WORKDIR/skipped_files.txt)."""
    how = f"from the cache in {folder}" if hit else "decoded"
    roots = train.root + (f" and {test.root}" if test else "")
    line = (f"{roots}: {len(splits[0]):,} train / {len(splits[1]):,} test {train.kind}s of {len(train.folders)} "
            f"classes, {how} in {seconds:.1f}s")
    ignored = train.ignored + (test.ignored if test else [])
    if ignored:
        line += f"; {_count(len(ignored), 'file')} that {'is' if len(ignored) == 1 else 'are'} not {train.kind}s " \
                f"ignored (e.g. {ignored[0]})"
    print(line, file=sys.stderr, flush=True)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
