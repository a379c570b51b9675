"""Decoded data larger than the memory budget: rows read from an .npy on disk, and written to one in pieces.

Reading memory-maps nothing: a page of a mapped file that a process touches
counts in its resident set, so random batches over an epoch would grow it to
the whole file. `DiskArray` instead reads each row with pread(2) into a
fresh array (the kernel's page cache still serves repeated reads, but it is
not this process's memory). `ArrayWriter` fills a preallocated .npy
(numpy.lib.format.open_memmap creates it) with pwrite(2), a piece at a
time, so building the cache never holds the decoded set either.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cnn.errors import ConfigError

PIECE_BYTES = 16 << 20  # what a sequential pass (checksum, describe) holds at a time
READERS = min(4, os.cpu_count() or 1)  # threads per gather: pread releases the GIL, a disk serves several at once


def memory_budget(value: float | None) -> tuple[int, str]:
    """Bytes of decoded data a process may hold (data.max_memory_gb), and how the figure was chosen.

    The default, a quarter of physical memory divided by the processes on
    this machine ($LOCAL_WORLD_SIZE or $SLURM_NTASKS_PER_NODE, else 1), leaves
    room for the model, the staged batches, XLA and the operating system. A
    container's or job's memory limit (cgroup, as SLURM sets) counts as the memory.
    """
    if value is not None:
        return int(float(value) * 1e9), f"data.max_memory_gb={float(value):g}"
    total = min(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), _cgroup_limit())
    local = next((int(v) for v in (os.environ.get(k) for k in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"))
                  if v and v.isdigit() and int(v) > 0), 1)
    budget = total // 4 // local
    return budget, f"data.max_memory_gb (default {budget / 1e9:.2f}: a quarter of memory / {local} local process(es))"


def _cgroup_limit() -> int:
    """The memory limit of this process's cgroup (v2, else v1), or a huge number where there is none."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return 1 << 62


class DiskArray:
    """The rows `rows` (all if None) of the array in the .npy at `path`, read on demand.

    Indexing with an int, a slice or an int array returns a numpy array (a
    copy), as indexing an in-memory array would; `take` selects rows without
    reading them. The file is opened once, when the array is made; a forked child opens it again.
    """

    def __init__(self, path: str, rows: np.ndarray | None = None):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{path}: a Fortran-ordered array cannot be read by rows")
        self.path, self.dtype, self.file_shape, self.rows = path, np.dtype(dtype), tuple(shape), rows
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._handle = _Handle(path)  # open now: a later rebuild of the entry (a rename over it) leaves this intact

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.file_shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.file_shape)

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def __len__(self) -> int:
        return self.file_shape[0] if self.rows is None else len(self.rows)

    def take(self, rows: np.ndarray) -> DiskArray:
        """The rows `rows` of this array, still on disk."""
        out = DiskArray.__new__(DiskArray)
        out.__dict__.update(self.__dict__)  # the same open file
        rows = np.asarray(rows, np.int64)
        out.rows = rows if self.rows is None else self.rows[rows]
        return out

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self.read(np.array([key]))[0]
        if isinstance(key, slice):
            return self.read(np.arange(len(self))[key])
        return self.read(np.asarray(key))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.read(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype)

    def _file(self) -> int:
        return self._handle.fd()

    def read(self, index: np.ndarray) -> np.ndarray:
        """The rows `index` names (any shape of ints, negative ones from the end) as one array index.shape + row."""
        index = np.asarray(index, np.int64)
        flat = np.where(index < 0, index + len(self), index).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows of {self.path}")
        rows = flat if self.rows is None else self.rows[flat]
        out = np.empty((len(rows), *self.file_shape[1:]), self.dtype)
        flat_out = out.reshape(len(rows), -1).view(np.uint8)
        order = np.argsort(rows, kind="stable")  # ascending offsets: a disk reads ahead
        parts = np.array_split(order, min(READERS, max(1, len(order) // 256)))
        if len(parts) == 1:
            self._read_rows(rows, parts[0], flat_out)
        else:
            with ThreadPoolExecutor(len(parts)) as pool:
                list(pool.map(lambda p: self._read_rows(rows, p, flat_out), parts))
        return out.reshape(*index.shape, *self.file_shape[1:])

    def _read_rows(self, rows: np.ndarray, which: np.ndarray, out: np.ndarray) -> None:
        fd, size, offset = self._file(), self.row_bytes, self.offset
        for i in which.tolist():
            done = os.preadv(fd, [out[i]], offset + int(rows[i]) * size)
            if done != size:
                raise OSError(f"{self.path} is cut short (row {int(rows[i])}); delete it to rebuild the cache")

    def pieces(self, piece_bytes: int = PIECE_BYTES):
        """(start, rows) over the whole array in order, `piece_bytes` at a time: a pass in bounded memory."""
        step = max(1, piece_bytes // max(1, self.row_bytes))
        for start in range(0, len(self), step):
            yield start, self.read(np.arange(start, min(len(self), start + step)))

    def close(self) -> None:
        """Closes the file now (for this array and every `take` of it), so it can be renamed or removed."""
        self._handle.close()


class _Handle:
    """One open descriptor, shared by an array and the arrays taken from it; closed when the last one goes."""

    def __init__(self, path: str):
        self.path, self._fd, self._pid = path, os.open(path, os.O_RDONLY), os.getpid()

    def fd(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # closed, or a forked child: open it for this process
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        self.close()


def file_checksum(path: str) -> int:
    """crc32 of the array data in the .npy at `path`, as cache.checksum gives for the array, read in pieces."""
    array = DiskArray(path)
    crc, fd = 0, array._file()
    position, end = array.offset, array.offset + array.nbytes
    while position < end:
        piece = os.pread(fd, min(PIECE_BYTES, end - position), position)
        if not piece:
            raise OSError(f"{path} is cut short")
        crc, position = zlib.crc32(piece, crc), position + len(piece)
    array.close()
    return crc


class ArrayWriter:
    """A preallocated .npy of `shape` and `dtype` at `path`, filled by `write(start, rows)` in pieces."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype):
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        if 0 in self.shape:
            np.save(path, np.zeros(self.shape, self.dtype))
            self.offset = DiskArray(path).offset
        else:
            mapped = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=self.shape)
            self.offset = mapped.offset
            del mapped  # only the header and the file's size were wanted: rows go in with pwrite
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(path, os.O_WRONLY)

    @classmethod
    def reopen(cls, path: str) -> ArrayWriter:
        """A writer for the .npy at `path`, written before and closed: its rows can be written again."""
        array = DiskArray(path)
        writer = cls.__new__(cls)
        writer.path, writer.shape, writer.dtype, writer.offset = path, array.file_shape, array.dtype, array.offset
        writer.row_bytes, writer._fd = array.row_bytes, os.open(path, os.O_WRONLY)
        return writer

    def write(self, start: int, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, self.dtype)
        if rows.shape[1:] != self.shape[1:] or start + len(rows) > self.shape[0]:
            raise ValueError(f"rows {rows.shape} at {start} do not fit {self.shape}")
        data, position = memoryview(rows).cast("B"), self.offset + start * self.row_bytes
        while data:
            done = os.pwrite(self._fd, data, position)
            data, position = data[done:], position + done

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


def select(array, rows: np.ndarray):
    """`array[rows]`, left on disk for a DiskArray."""
    return array.take(rows) if isinstance(array, DiskArray) else array[rows]


def refuse_conversion(field: str, value, shape: tuple[int, ...]) -> None:
    """Resizing or recolouring a streamed set would need it whole in memory: name the fix instead."""
    raise ConfigError(f"data.{field}={value!r} would change images shaped {shape} that are streamed from disk "
                      f"(larger than data.max_memory_gb); convert them when decoding (image folders do), or raise "
                      f"data.max_memory_gb")
