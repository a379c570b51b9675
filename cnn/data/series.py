"""Time-series files: UCR/UEA .ts files, and the UCR 2018 .tsv/.csv layout (label, then the values).

Inputs come out float32 (N, length, channels). Series shorter than the
longest (of both splits) are padded with zeros at the end; with
data.max_length set, every series is cut or padded to that length.
Missing values (NaN, or '?' in .ts files): those at the end of a series mark
its end (UCR 2018 pads variable-length series so) and are dropped; those
inside are filled by linear interpolation between their neighbours, and a
channel with no value at all is zeros. Class names are the labels, in the
order a .ts file's @classLabel header lists them, else sorted (numerically
when every label is a number). The reader is plain Python: aeon reads the
same files, but importing it costs seconds.
"""

from __future__ import annotations

import os
import sys
import time

import ml_collections
import numpy as np

import cnn.data.cache as cache_lib
from cnn.data.dataset import Dataset, Split
from cnn.data.split import split_off
from cnn.errors import ConfigError

EXTENSIONS = (".ts", ".tsv", ".csv")


class _Series:
    """One file's series (each (length, channels) float64), labels as written, and the declared classes."""

    def __init__(self, series: list[np.ndarray], labels: list[str], classes: list[str] | None):
        self.series, self.labels, self.classes = series, labels, classes


def _check_file(path: str | None, field: str) -> str:
    if not path:
        raise ConfigError(f"data.name='series_file' needs {field}: the path of a .ts, .tsv or .csv file")
    if not os.path.exists(path):
        raise ConfigError(f"{field}={path!r} does not exist; point it at a .ts, .tsv or .csv file")
    if os.path.isdir(path):
        raise ConfigError(f"{field}={path!r} is a folder; series_file reads one .ts, .tsv or .csv file")
    if not path.lower().endswith(EXTENSIONS):
        raise ConfigError(f"{field}={path!r}: series_file reads UCR/UEA .ts files and UCR 2018 .tsv or .csv files "
                          "(label first, then the values)")
    return path


def read_file(path: str, field: str = "data.path") -> _Series:
    """The series of one .ts, .tsv or .csv file; a malformed line is an error naming its number."""
    _check_file(path, field)
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    parsed = _read_ts(lines, path, field) if path.lower().endswith(".ts") else \
        _read_table(lines, path, field, "\t" if path.lower().endswith(".tsv") else ",")
    if not parsed.series:
        raise ConfigError(f"{field}={path!r} holds no series")
    return parsed


def _values(text: str, where: str) -> np.ndarray:
    try:
        return np.array(text.replace("?", "nan").split(","), np.float64)
    except ValueError:
        pass
    try:  # empty fields are missing values too
        return np.array([float("nan") if v.strip() in ("?", "") else float(v) for v in text.split(",")])
    except ValueError:
        bad = next(v for v in text.split(",") if not _is_number(v))
        raise ConfigError(f"{where}: {bad.strip()[:30]!r} is not a number; values are numbers, with NaN or ? for "
                          "missing ones") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text.strip() in ("?", "")
    return True


def _header(lines: list[str], path: str, field: str) -> tuple[dict[str, str], int]:
    """The @ fields of a .ts header (names lowercased) and the index of the first data line."""
    header = {}
    for number, raw in enumerate(lines):
        line = raw.strip()
        if not line or line.startswith(("#", "%")):
            continue
        if not line.startswith("@"):
            raise ConfigError(f"{field}={path!r} line {number + 1}: values before the @data line; a .ts file "
                              "starts with @problemName, @classLabel true LABELS ..., then @data")
        name, _, value = line[1:].partition(" ")
        if name.lower() == "data":
            return header, number + 1
        header[name.lower()] = value.strip()
    raise ConfigError(f"{field}={path!r} has no @data line; a .ts file's header ends with @data, then one series "
                      "per line")


def _read_ts(lines: list[str], path: str, field: str) -> _Series:
    header, first = _header(lines, path, field)
    where = f"{field}={path!r}"
    if header.get("targetlabel", "false").lower().startswith("true"):
        raise ConfigError(f"{where} is a regression set (@targetLabel true); cnn classifies: use a set with "
                          "@classLabel true and its labels")
    label_line = header.get("classlabel", "").split()
    if not label_line or label_line[0].lower() != "true" or len(label_line) < 2:
        raise ConfigError(f"{where} has no class labels in its header (found @classLabel "
                          f"{header.get('classlabel', '(missing)')!r}); write @classLabel true LABEL1 LABEL2 ...")
    if header.get("timestamps", "false").lower() == "true":
        raise ConfigError(f"{where} has @timeStamps true; write the series as plain values (@timeStamps false)")
    classes = label_line[1:]
    dimensions = header.get("dimensions")
    if dimensions is not None and not dimensions.isdigit():
        raise ConfigError(f"{where}: @dimensions {dimensions!r} is not a whole number")
    series, labels = [], []
    for number in range(first, len(lines)):
        line = lines[number].strip()
        if not line or line.startswith(("#", "%")):
            continue
        *channels, label = line.split(":")
        at = f"{where} line {number + 1}"
        expected = int(dimensions) if dimensions else len(channels) if not series else series[0].shape[1]
        if not channels or len(channels) != expected:
            cut = "; it is the file's last line: is the file cut short?" if number == len(lines) - 1 else ""
            raise ConfigError(f"{at}: {len(channels)} dimensions where the file has {expected}; each line is "
                              f"VALUES:VALUES:...:LABEL, one VALUES per dimension{cut}")
        label = label.strip()
        if label not in classes:
            raise ConfigError(f"{at}: label {label!r} is not among @classLabel's {' '.join(classes)}")
        values = [_values(c, at) for c in channels]
        longest = max(len(v) for v in values)
        series.append(np.stack([np.pad(v, (0, longest - len(v)), constant_values=np.nan) for v in values], -1))
        labels.append(label)
    return _Series(series, labels, classes)


def _read_table(lines: list[str], path: str, field: str, delimiter: str) -> _Series:
    series, labels = [], []
    for number, raw in enumerate(lines):
        line = raw.strip()
        if not line:
            continue
        label, *values = line.split(delimiter)
        if not values:
            raise ConfigError(f"{field}={path!r} line {number + 1}: a label but no values; each line is the "
                              f"label, then the series, separated by {'tabs' if delimiter == chr(9) else 'commas'}")
        series.append(_values(",".join(values), f"{field}={path!r} line {number + 1}")[:, None])
        labels.append(_label(label.strip()))
    return _Series(series, labels, None)


def _label(text: str) -> str:
    """'1.0' and '1' are one class: whole numbers are written without a decimal point."""
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else text


def _classes(labels: list[str]) -> list[str]:
    unique = sorted(set(labels))
    try:
        return sorted(unique, key=float)
    except ValueError:
        return unique


def fill_missing(series: np.ndarray) -> np.ndarray:
    """(length, channels) with NaNs: trailing ones cut (the series ended), inner ones interpolated linearly."""
    present = ~np.isnan(series)
    rows = np.flatnonzero(present.any(axis=1))
    series = series[:rows[-1] + 1] if rows.size else series[:0]
    out = np.zeros(series.shape, np.float64)
    steps = np.arange(len(series))
    for c in range(series.shape[1]):
        known = ~np.isnan(series[:, c])
        if known.any():
            out[:, c] = np.interp(steps, steps[known], series[known, c])
    return out


def _stack(series: list[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(series), length, series[0].shape[1]), np.float32)
    for i, s in enumerate(series):
        out[i, :min(length, len(s))] = s[:length]
    return out


def _build(data: ml_collections.ConfigDict) -> cache_lib.Entry:
    train = read_file(data.path, "data.path")
    test = read_file(data.test_path, "data.test_path") if data.get("test_path") else None
    classes = train.classes or _classes(train.labels)
    parts = {"train": train} if test is None else {"train": train, "test": test}
    if len(set(train.labels)) < 2:
        raise ConfigError(f"data.path={data.path!r} holds one class ({train.labels[0]!r}); a classifier needs two "
                          "or more")
    for name, part in parts.items():
        field, path = ("data.test_path", data.test_path) if name == "test" else ("data.path", data.path)
        if part.series[0].shape[1] != train.series[0].shape[1]:
            raise ConfigError(f"{field}={path!r} has {part.series[0].shape[1]} dimensions per series but data.path "
                              f"has {train.series[0].shape[1]}")
        unknown = sorted(set(part.labels) - set(classes))
        if unknown:
            raise ConfigError(f"{field}={path!r} has labels that data.path lacks: "
                              f"{', '.join(map(repr, unknown[:5]))}; the training classes are "
                              f"{', '.join(map(repr, classes[:10]))}")
        part.series = [fill_missing(s) for s in part.series]
    length = data.get("max_length") or max(len(s) for part in parts.values() for s in part.series)
    index = {c: i for i, c in enumerate(classes)}
    arrays = {}
    for name, part in parts.items():
        arrays[f"{name}_images"] = _stack(part.series, int(length))
        arrays[f"{name}_labels"] = np.array([index[label] for label in part.labels], np.int32)
    return cache_lib.Entry(arrays, {"class_names": classes})


def _stamp(path: str | None) -> list | None:
    if not path:
        return None
    stat = os.stat(path)
    return [os.path.realpath(path), stat.st_size, stat.st_mtime_ns]


def load_series_file(data: ml_collections.ConfigDict, seed: int) -> Dataset:
    """data.name='series_file': both splits (the test one held out if there is no test file), parsed once and
    cached."""
    start = time.time()
    _check_file(data.get("path"), "data.path")
    if data.get("test_path"):
        _check_file(data.test_path, "data.test_path")
    settings = {"max_length": data.get("max_length"), "test_path": data.get("test_path") and
                os.path.realpath(data.test_path)}
    key = {**settings, "train": _stamp(data.path), "test": _stamp(data.get("test_path"))}
    folder = cache_lib.entry_folder(data, "series_file", data.path, settings) if data.cache else None
    entry, hit = cache_lib.cached(folder, key, lambda: _build(data))
    a = entry.arrays
    if "test_images" in a:
        train, test = Split(a["train_images"], a["train_labels"]), Split(a["test_images"], a["test_labels"])
    else:
        train, test = split_off(a["train_images"], a["train_labels"], float(data.test_fraction), seed)
    print(f"{data.path}: {len(train):,} train / {len(test):,} test series of {train.images.shape[1]} steps and "
          f"{train.images.shape[2]} channels, {len(entry.info['class_names'])} classes, "
          f"{'from the cache' if hit else 'read'} in {time.time() - start:.1f}s", file=sys.stderr, flush=True)
    return Dataset("series_file", train, test, list(entry.info["class_names"]))
