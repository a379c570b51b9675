"""Decoded arrays kept on disk, so a dataset is decoded once and later runs start in seconds.

An entry is one folder: each array as its own NAME.npy (so it can be
memory-mapped later), and manifest.json with, for each array, its shape,
dtype, byte size and crc32, plus the key the entry was built from and what
the source needs back (class names, skipped files). It is written to a
temporary folder beside it and renamed into place, so a run killed
mid-write leaves nothing that looks valid. A read checks the key (other
files or settings: rebuilt) and every size and checksum (a truncated,
edited or missing file: rebuilt, with a one-line notice on stderr).

TFDS sets keep their entries beside the prepared data (DATA_DIR/cnn_cache/);
folders and files in `data.cache_dir`, else $CNN_CACHE_DIR, else
~/.cache/cnn (`root`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np

from cnn import workdir
import cnn.data.stream as stream

FORMAT = 1  # bump when the layout changes: older entries are then rebuilt
MANIFEST = "manifest.json"


@dataclasses.dataclass
class Entry:
    arrays: dict[str, np.ndarray | stream.DiskArray]
    info: dict[str, Any]  # JSON: class names, skipped files, ...
    streamed: bool = False  # inputs left on disk (DiskArrays): the entry is larger than the memory budget
    size: int = 0  # bytes of every array, decoded


def root(data: ml_collections.ConfigDict) -> str:
    """Where entries for folders and files go: data.cache_dir, else $CNN_CACHE_DIR, else ~/.cache/cnn."""
    where = data.get("cache_dir") or os.environ.get("CNN_CACHE_DIR")
    if not where:
        where = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "cnn")
    return os.path.expanduser(where)


def entry_folder(data: ml_collections.ConfigDict, kind: str, source: str, settings: dict) -> str:
    """One entry per source and decoding settings: a rebuild replaces it instead of adding another."""
    ident = json.dumps([os.path.realpath(source), settings], sort_keys=True)
    name = os.path.basename(os.path.normpath(source)) or "root"
    return os.path.join(root(data), kind, f"{name}-{hashlib.blake2b(ident.encode(), digest_size=8).hexdigest()}")


def checksum(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def _plain(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), so keys compare equal."""
    return json.loads(json.dumps(value))


def read(folder: str, key: Any, budget: int | None = None) -> Entry | None:
    """The entry in `folder` if it was built from `key` and is intact; None (and a notice if damaged) otherwise.

    With `budget` (bytes) and an entry larger than it, its inputs (arrays of
    two or more dimensions) come back as DiskArrays, read from disk by rows;
    labels are always loaded.
    """
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    manifest = workdir.read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "arrays" not in manifest:
        return _damaged(folder, "unreadable manifest.json")
    if manifest.get("key") != _plain(key):
        print(f"note: the data changed since it was cached in {folder}; decoding it again", file=sys.stderr,
              flush=True)
        return None
    size = sum(int(meta.get("bytes", 0)) for meta in manifest["arrays"].values())
    streamed = budget is not None and size > budget
    arrays = {}
    for name, meta in manifest["arrays"].items():
        array = _read_array(os.path.join(folder, meta["file"]), meta, streamed and len(meta["shape"]) >= 2)
        if isinstance(array, str):
            return _damaged(folder, array)
        arrays[name] = array
    return Entry(arrays, manifest.get("info", {}), streamed=streamed, size=size)


def _read_array(file: str, meta: dict, on_disk: bool) -> np.ndarray | stream.DiskArray | str:
    """The array in `file`, loaded or left on disk, checked against its manifest entry; or what is wrong with it."""
    name = os.path.basename(file)
    try:
        array = stream.DiskArray(file) if on_disk else np.load(file, allow_pickle=False)
        if (list(array.shape) != meta["shape"] or array.dtype.str != meta["dtype"] or array.nbytes != meta["bytes"]
                or (stream.file_checksum(file) if on_disk else checksum(array)) != meta["crc32"]):
            return f"{name} does not match its size or checksum"
    except (OSError, ValueError, EOFError) as e:
        return f"{name}: {str(e).splitlines()[0][:100] if str(e) else type(e).__name__}"
    return array


def _damaged(folder: str, why: str) -> None:
    print(f"note: the cache entry {folder} is damaged ({why}); rebuilding it", file=sys.stderr, flush=True)
    return None


def write(folder: str, key: Any, entry: Entry) -> None:
    """Writes `entry` atomically; a failure (a full disk, a read-only cache) stops the run with one line naming
    the folder and the cause, before any training would meet the same disk."""
    _write_with(folder, key, lambda tmp: entry)


def _write_with(folder: str, key: Any, build: Callable[[str], Entry]) -> None:
    """`build(tmp)` gives the entry, its DiskArrays already written in the temporary folder `tmp` (in pieces,
    never whole in memory); the rest is saved there, then the manifest, then `tmp` is renamed into place."""
    parent, base = os.path.split(os.path.normpath(folder))
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        _remove_abandoned(parent, base)
        entry = build(tmp)
        arrays = {}
        for name, array in entry.arrays.items():
            file = os.path.join(tmp, f"{name}.npy")
            if isinstance(array, stream.DiskArray):
                if os.path.realpath(array.path) != os.path.realpath(file):
                    raise ValueError(f"{name}: a DiskArray to cache must be written as {file}")
                crc = stream.file_checksum(file)
            else:
                array = np.ascontiguousarray(array)
                np.save(file, array, allow_pickle=False)
                crc = checksum(array)
            arrays[name] = {"file": f"{name}.npy", "shape": list(array.shape), "dtype": array.dtype.str,
                            "bytes": int(array.nbytes), "crc32": crc}
        workdir.fault("cache")  # test hook: a full disk, or a kill, with the arrays written but no manifest
        manifest = {"format": FORMAT, "key": _plain(key), "arrays": arrays, "info": _plain(entry.info)}
        workdir.write_json(os.path.join(tmp, MANIFEST), manifest)
        _swap(tmp, folder)
    except OSError as e:
        raise workdir.write_failed(folder, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_abandoned(parent: str, base: str) -> None:
    """Deletes the temporary folders of writers of this entry that were killed before they finished."""
    prefix = f".{base}.tmp-"
    for name in os.listdir(parent):
        if name.startswith(prefix):
            pid = name[len(prefix):].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


def _swap(tmp: str, folder: str) -> None:
    """Renames `tmp` onto `folder`, setting an older entry aside first (a folder cannot be renamed over)."""
    old = None
    if os.path.exists(folder):
        old = f"{tmp}.old"
        os.rename(folder, old)
    try:
        os.rename(tmp, folder)
    except OSError:
        if not os.path.exists(os.path.join(folder, MANIFEST)):
            raise  # not another process finishing the same entry first
    finally:
        if old:
            shutil.rmtree(old, ignore_errors=True)


def cached(folder: str | None, key: Any, build: Callable[[], Entry]) -> tuple[Entry, bool]:
    """The entry for `key` from `folder`, or `build()` written there; and whether it came from the cache.

    `folder=None` (data.cache=False) always builds and writes nothing.
    """
    if folder is not None:
        entry = read(folder, key)
        if entry is not None:
            return entry, True
    entry = build()
    if folder is not None:
        write(folder, key, entry)
    return entry, False


@contextlib.contextmanager
def _building(folder: str) -> Iterator[None]:
    """Holds an exclusive lock beside `folder` (flock), so concurrent runs decode an entry once; where the
    filesystem has no locks, each builds its own and the atomic rename keeps the result whole."""
    parent, base = os.path.split(os.path.normpath(folder))
    handle = None
    try:
        os.makedirs(parent, exist_ok=True)
        handle = open(os.path.join(parent, f".{base}.lock"), "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:
        pass
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


def cached_within(folder: str | None, key: Any, build: Callable[[str | None], Entry], budget: int, why: str
                  ) -> tuple[Entry, bool]:
    """As `cached`, for sources that can decode into files: `build(tmp)` writes its inputs into `tmp` in pieces
    (`build(None)`: in memory, for data.cache=False). An entry larger than `budget` bytes is then read from
    disk by rows (DiskArrays) instead of loaded; one line then says so and why (`why` names the budget)."""
    hit = True
    if folder is None:
        entry, hit = build(None), False
        entry.size = sum(int(a.nbytes) for a in entry.arrays.values())
    else:
        with _building(folder):  # the processes of a node: one decodes, the others then read its entry
            entry = read(folder, key, budget)
            if entry is None:
                _write_with(folder, key, build)
                entry, hit = read(folder, key, budget), False
        if entry is None:
            raise workdir.write_failed(folder, OSError("the entry just written does not read back"))
    report_path(entry, folder, why, budget)
    return entry, hit


def report_path(entry: Entry, folder: str | None, why: str, budget: int | None = None) -> None:
    """One line on stderr when the entry's data is over the memory budget: streamed from `folder`, or held in
    memory all the same (data.cache=False), and why. Data within the budget, the usual case, says nothing."""
    gb = entry.size / 1e9
    if entry.streamed:
        line = f"data: {gb:.2f} GB decoded > {why}: streaming from {folder}"
    elif folder is None and budget is not None and entry.size > budget:
        line = f"data: {gb:.2f} GB decoded > {why}, but data.cache=False: in memory (streaming reads the cache)"
    else:
        return
    print(line, file=sys.stderr, flush=True)
