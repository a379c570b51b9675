"""Arrays already in memory (`cnn.from_arrays`) or in an .npz file (data.name='npz').

    dataset = cnn.from_arrays(x_train, y_train, x_test, y_test, class_names=None)
    cnn.train_and_evaluate(config, workdir, dataset=dataset)

Inputs are uint8 images (N, height, width[, channels]), float images in
[0, 1] (N, height, width, channels; stored as uint8, so they train, augment
and predict as decoded files do) or float series (N, length[, channels]).
Labels are ints or strings; without `class_names` the classes are the sorted
distinct training labels, named by their text.
"""

from __future__ import annotations

import os
import sys
import zipfile

import ml_collections
import numpy as np

import cnn.data.cache as cache_lib
import cnn.data.stream as stream
from cnn.data.dataset import Dataset, Split
from cnn.data.split import hold_out
from cnn.errors import ConfigError

NAME = "arrays"  # Dataset.name of what from_arrays returns
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")  # the Keras mnist.npz convention
ACCEPTED = ("uint8 images (N, height, width[, channels]), float images in [0, 1] (N, height, width, channels) "
            "or float series (N, length[, channels])")


def inputs(x, name: str) -> np.ndarray:
    """`x` as training reads it: uint8 NHWC images or float32 (N, length, channels) series."""
    x = np.asarray(x)
    if x.dtype == np.uint8 and x.ndim in (3, 4):
        out = x[..., None] if x.ndim == 3 else x  # (N, H, W): grey images
    elif np.issubdtype(x.dtype, np.floating) and x.ndim in (2, 3, 4):
        finite = np.isfinite(x)
        if not finite.all():
            where = tuple(int(v) for v in np.argwhere(~finite)[0])
            raise ConfigError(f"{name} holds {int((~finite).sum()):,} NaN or infinite values (the first at index "
                              f"{where}); fill or drop them first")
        if x.ndim == 4:
            if x.size and (x.min() < 0 or x.max() > 1):
                raise ConfigError(f"{name} holds float images with values in [{x.min():.3g}, {x.max():.3g}]; pass "
                                  "them scaled to [0, 1], or as uint8 0-255")
            out = np.round(x * 255).astype(np.uint8)
        else:
            out = (x[..., None] if x.ndim == 2 else x).astype(np.float32)
    else:
        raise ConfigError(f"{name} is {x.dtype} shaped {x.shape}; cnn takes {ACCEPTED}")
    if len(out) == 0:
        raise ConfigError(f"{name} has no examples")
    return out


def _raw_labels(y, name: str, count: int, x_name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ConfigError(f"{name} has shape {y.shape}; pass one label per example, shape (N,) (one-hot labels: "
                          "y.argmax(-1))")
    if len(y) != count:
        raise ConfigError(f"{name} has {len(y):,} labels but {x_name} has {count:,} examples")
    if y.dtype.kind == "f":
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise ConfigError(f"{name} holds labels that are not whole numbers; pass int or string labels")
        y = y.astype(np.int64)
    if y.dtype.kind == "S":
        y = y.astype(str)
    if y.dtype.kind not in "iuU":
        raise ConfigError(f"{name} is {y.dtype}; pass int or string labels")
    return y


def _encode(y: np.ndarray, name: str, class_names: list[str]) -> np.ndarray:
    """int32 indices into `class_names` for int labels (the index itself) or string labels (the name)."""
    if y.dtype.kind == "U":
        index = {c: i for i, c in enumerate(class_names)}
        unknown = sorted({v for v in y.tolist() if v not in index})
        if unknown:
            raise ConfigError(f"{name} holds labels outside class_names: {', '.join(map(repr, unknown[:5]))}; "
                              f"class_names is {class_names[:10]}{' ...' if len(class_names) > 10 else ''}")
        return np.array([index[v] for v in y.tolist()], np.int32)
    outside = sorted({int(v) for v in y if not 0 <= v < len(class_names)})
    if outside:
        raise ConfigError(f"{name} holds labels outside class_names: {', '.join(map(str, outside[:5]))}; int labels "
                          f"index class_names, so they run from 0 to {len(class_names) - 1}")
    return y.astype(np.int32)


def _class_names(ys: dict[str, np.ndarray], class_names) -> tuple[list[str], dict[str, np.ndarray]]:
    """The class names, and int labels turned into indices of them when the names come from y_train."""
    if class_names is not None:
        names = [str(c) for c in class_names]
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"class_names={list(class_names)!r} must be distinct names, one per class")
        return names, ys
    distinct = np.unique(ys["y_train"]).tolist()
    if ys["y_train"].dtype.kind == "U":
        return [str(v) for v in distinct], ys
    lookup = {int(v): i for i, v in enumerate(distinct)}  # ints: their rank among y_train's, named by the value
    for key, y in ys.items():
        unknown = sorted({int(v) for v in y.tolist()} - lookup.keys())
        if unknown:
            raise ConfigError(f"{key} holds labels that y_train lacks: {', '.join(map(str, unknown[:5]))}")
    return [str(v) for v in distinct], {key: np.array([lookup[int(v)] for v in y.tolist()], np.int64)
                                         for key, y in ys.items()}


def from_arrays(x_train, y_train, x_test, y_test, class_names=None) -> Dataset:
    """A dataset from arrays, for `cnn.train_and_evaluate(config, workdir, dataset=...)`.

    `config.data` then only says how to preprocess (image_size, channels,
    mean, std, augmentation). Each problem (lengths that differ, NaN or inf,
    an unsupported dtype, labels outside `class_names`) is a ConfigError
    naming the argument.
    """
    xs = {"x_train": inputs(x_train, "x_train"), "x_test": inputs(x_test, "x_test")}
    ys = {"y_train": _raw_labels(y_train, "y_train", len(xs["x_train"]), "x_train"),
          "y_test": _raw_labels(y_test, "y_test", len(xs["x_test"]), "x_test")}
    if xs["x_test"].shape[1:] != xs["x_train"].shape[1:] or xs["x_test"].dtype != xs["x_train"].dtype:
        raise ConfigError(f"x_test examples are {xs['x_test'].dtype} {xs['x_test'].shape[1:]} but x_train's are "
                          f"{xs['x_train'].dtype} {xs['x_train'].shape[1:]}; both need one shape and kind")
    if (ys["y_train"].dtype.kind == "U") != (ys["y_test"].dtype.kind == "U"):
        raise ConfigError("y_train and y_test must both be int labels or both string labels")
    names, ys = _class_names(ys, class_names)
    labels = {key: _encode(y, key, names) for key, y in ys.items()}
    if len(names) < 2 or len(np.unique(labels["y_train"])) < 2:
        raise ConfigError(f"y_train holds one class ({names[int(labels['y_train'][0])]!r}); a classifier needs two "
                          "or more")
    return Dataset(NAME, Split(xs["x_train"], labels["y_train"]), Split(xs["x_test"], labels["y_test"]), names)


def load_npz(data: ml_collections.ConfigDict, seed: int) -> Dataset:
    """data.name='npz': x_train, y_train (and x_test, y_test, else held out) and optionally class_names from
    data.path, as keras.datasets' mnist.npz stores them."""
    path = data.get("path")
    if not path or not os.path.isfile(path):
        problem = "is a folder" if path and os.path.isdir(path) else "does not exist"
        raise ConfigError(f"data.path={path!r} {problem}; data.name='npz' reads one .npz file with x_train, y_train, "
                          "x_test, y_test (np.savez(path, x_train=..., ...))")
    if data.get("test_path"):
        raise ConfigError(f"data.test_path={data.test_path!r}: an .npz holds its own test split (x_test, y_test); "
                          "put it in data.path's file, or leave it out to hold out data.test_fraction")
    streamed = _load_streamed(data, path, seed)
    if streamed is not None:
        return streamed
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:
        raise ConfigError(f"data.path={path!r} holds Python objects or is not an .npz file ({str(e)[:100]}); save "
                          "plain arrays with np.savez") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:  # truncated by a failed copy, or not an .npz at all
        raise ConfigError(f"data.path={path!r} could not be read as an .npz file ({str(e)[:100] or type(e).__name__}); "
                          "is it cut short? copy it again, or save it with np.savez") from None
    need = ["x_train", "y_train"] + (["x_test", "y_test"] if "x_test" in arrays or "y_test" in arrays else [])
    missing = [k for k in need if k not in arrays]
    if missing:
        raise ConfigError(f"data.path={path!r} lacks {', '.join(map(repr, missing))} (it has "
                          f"{', '.join(map(repr, sorted(arrays))) or 'no arrays'}); an npz holds x_train, y_train "
                          "and optionally x_test, y_test (else data.test_fraction is held out)")
    names = arrays["class_names"].tolist() if "class_names" in arrays else None
    try:
        if "x_test" in arrays:
            dataset = from_arrays(*(arrays[k] for k in NPZ_KEYS), class_names=names)
        else:
            x, y = arrays["x_train"], arrays["y_train"]
            y = _raw_labels(y, "y_train", len(np.atleast_1d(x)), "x_train")  # a mismatch is named before a split
            train, test = hold_out(np.unique(y, return_inverse=True)[1], float(data.test_fraction), seed)
            dataset = from_arrays(x[train], y[train], x[test], y[test], class_names=names)
    except ConfigError as e:
        raise ConfigError(f"data.path={path!r}: {e}") from None
    dataset.name = "npz"
    return dataset


def _members(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]] | None:
    """Each array's (shape, dtype) from its .npy header inside the .npz, nothing decompressed beyond it; None
    when the file cannot be read this way (the in-memory path then names the problem)."""
    try:
        with zipfile.ZipFile(path) as archive:
            out = {}
            for name in archive.namelist():
                with archive.open(name) as f:
                    shape, fortran, dtype = _header(f)
                if fortran or dtype.hasobject:
                    return None
                out[name[:-4] if name.endswith(".npy") else name] = (shape, dtype)
            return out
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def _header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return tuple(shape), fortran, np.dtype(dtype)


def _load_streamed(data: ml_collections.ConfigDict, path: str, seed: int) -> Dataset | None:
    """An .npz whose inputs exceed data.max_memory_gb, copied into the cache a piece at a time and read from
    there by rows (cache.cached_within); None (load it whole, as always) when it fits, or cannot stream."""
    members = _members(path)
    budget, why = stream.memory_budget(data.get("max_memory_gb"))
    if not members or not data.get("cache") or "x_train" not in members or "y_train" not in members:
        return None
    size = sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in members.values())
    if size <= budget:
        return None
    stat = os.stat(path)
    key = {"size": stat.st_size, "mtime": stat.st_mtime_ns, "format": "npz-1"}
    folder = cache_lib.entry_folder(data, "npz", path, {})
    try:
        entry, _ = cache_lib.cached_within(folder, key, lambda tmp: _build_npz(path, members, tmp), budget, why)
    except ConfigError as e:
        raise ConfigError(f"data.path={path!r}: {e}") from None
    a, names = entry.arrays, entry.info["class_names"]
    if "x_test" in a:
        train, test = Split(a["x_train"], a["y_train"]), Split(a["x_test"], a["y_test"])
    else:
        rows = hold_out(a["y_groups"], float(data.test_fraction), seed)
        train, test = (Split(stream.select(a["x_train"], r), a["y_train"][r]) for r in rows)
    print(f"{path}: {len(train):,} train / {len(test):,} test examples of {tuple(a['x_train'].shape[1:])}, "
          f"{len(names)} classes", file=sys.stderr, flush=True)
    return Dataset("npz", train, test, names)


def _build_npz(path: str, members: dict, tmp: str | None) -> cache_lib.Entry:
    """The cache entry of an .npz: inputs converted as `inputs` does, a piece at a time, into files in `tmp`;
    labels encoded as `from_arrays` does (they are small)."""
    keys = [k for k in NPZ_KEYS if k in members]
    with np.load(path, allow_pickle=False) as f:
        labels = {k: f[k] for k in keys if k.startswith("y_")}
        names = f["class_names"].tolist() if "class_names" in f.files else None
    # from_arrays checks and encodes the labels; the inputs stand in as zero-size broadcasts of their row shape
    stand_in = {k: np.broadcast_to(np.zeros(1, np.uint8), (members[k][0][0], 1, 1, 1)) for k in keys
                if k.startswith("x_")}
    if "x_test" not in members:
        stand_in["x_test"], labels["y_test"] = stand_in["x_train"][:1], labels["y_train"][:1]
    encoded = from_arrays(stand_in["x_train"], labels["y_train"], stand_in["x_test"], labels["y_test"], names)
    arrays = {"y_train": encoded.train.labels}
    if "x_test" in members:
        arrays["y_test"] = encoded.test.labels
    else:  # the groups load_npz holds out by: each distinct raw label, in sorted order
        raw = _raw_labels(labels["y_train"], "y_train", members["x_train"][0][0], "x_train")
        arrays["y_groups"] = np.unique(raw, return_inverse=True)[1].astype(np.int32)
    with zipfile.ZipFile(path) as archive:
        for key in (k for k in keys if k.startswith("x_")):
            arrays[key] = _copy_inputs(archive, key, members[key], tmp)
    shapes = {k: tuple(v.shape[1:]) for k, v in arrays.items() if k.startswith("x_")}
    if len(set(shapes.values())) > 1 or len({arrays[k].dtype for k in shapes}) > 1:
        raise ConfigError(f"x_test examples are {shapes.get('x_test')} but x_train's are {shapes['x_train']}; both "
                          "need one shape and kind")
    return cache_lib.Entry(arrays, {"class_names": encoded.class_names})


def _copy_inputs(archive: zipfile.ZipFile, key: str, member: tuple, tmp: str):
    """The input array `key`, read from the archive and converted (`inputs`) a piece of rows at a time."""
    shape, dtype = member
    if not shape or shape[0] == 0:
        raise ConfigError(f"{key} has no examples")
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    step, writer = max(1, stream.PIECE_BYTES // max(1, row_bytes)), None
    with archive.open(f"{key}.npy") as f:
        _header(f)
        for start in range(0, shape[0], step):
            count = min(step, shape[0] - start)
            raw = f.read(count * row_bytes)
            if len(raw) != count * row_bytes:
                raise ConfigError(f"{key} is cut short in the file; copy it again, or save it with np.savez")
            try:
                piece = inputs(np.frombuffer(raw, dtype).reshape(count, *shape[1:]), key)
            except ConfigError as e:
                raise ConfigError(f"{e} (in rows {start:,}-{start + count - 1:,})") from None
            if writer is None:
                writer = stream.ArrayWriter(os.path.join(tmp, f"{key}.npy"), (shape[0], *piece.shape[1:]),
                                            piece.dtype)
            writer.write(start, piece)
    writer.close()
    return stream.DiskArray(writer.path)
