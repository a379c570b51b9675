"""Which examples form each batch, and putting batches on the devices.

The order depends only on (seed, epoch), so a resumed run, or a run over
more devices or processes, sees the same batches; each process feeds its
own devices only its columns of every global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from cnn import sharding
from cnn.data.dataset import Split
from cnn.data.stream import DiskArray

CHUNK_BYTES = 64 << 20  # how much training data `stage_chunk` puts on the devices at a time


def epoch_index(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The example indices of each full batch of an epoch, [steps, batch_size]; the last partial batch is dropped."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // batch_size
    return order[:steps * batch_size].reshape(steps, batch_size)


def eval_index(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every example once, in batches of one fixed shape: (indices, mask), both [steps, batch_size]; padding has mask 0."""
    index = np.arange(-(-n // batch_size) * batch_size).reshape(-1, batch_size)
    mask = index < n
    return np.where(mask, index, 0), mask


def host_batch(split: Split, index: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """This process's columns of the batch `index` names, or of each batch if `index` is [steps, batch]."""
    columns = sharding.process_slice(index.shape[-1])
    out = {"image": split.images[index[..., columns]], "label": split.labels[index[..., columns]]}
    if mask is not None:
        out["mask"] = mask[..., columns]
    return out


def chunk_steps(split: Split, batch_size: int, steps_per_epoch: int) -> int:
    """Batches per chunk: an epoch of MNIST at once, fewer for larger inputs (bounded device memory)."""
    per_batch = batch_size * (split.images[0].nbytes + split.labels[0].nbytes)
    return max(1, min(steps_per_epoch, CHUNK_BYTES // per_batch))


def stage_chunk(split: Split, rows: np.ndarray, steps: int, chunk_sharding) -> dict[str, jax.Array]:
    """The batches `rows` ([n, batch] indices, n <= steps) on the devices as one [steps, batch, ...] chunk.

    Staging many batches at once leaves the host only dispatching steps.
    Short chunks (an epoch's last, or a resumed one) are padded with copies
    of their last batch, so every chunk has one shape and the step compiles once.
    """
    return sharding.put_batch(host_batch(split, _padded(rows, steps)), chunk_sharding)


def _padded(rows: np.ndarray, steps: int) -> np.ndarray:
    return np.concatenate([rows, np.repeat(rows[-1:], steps - len(rows), axis=0)])


def staged_chunks(split: Split, index: np.ndarray, first: int, steps: int, chunk_sharding
                  ) -> Iterator[dict[str, jax.Array]]:
    """The chunks (`stage_chunk`) of batches `index[first:]`, `steps` batches each, one at a time.

    A streamed split (a DiskArray) is gathered from disk one chunk ahead on a
    thread, so the reads overlap the steps of the chunk before; each process
    reads only its own columns of every batch. The batches are the same on
    either path: the order depends only on (seed, epoch).
    """
    starts = range(first, len(index), steps)
    if not isinstance(split.images, DiskArray):
        for start in starts:
            yield stage_chunk(split, index[start:start + steps], steps, chunk_sharding)
        return
    gather = lambda start: host_batch(split, _padded(index[start:start + steps], steps))  # noqa: E731
    pool = ThreadPoolExecutor(1, thread_name_prefix="cnn-prefetch")
    try:
        ahead = pool.submit(gather, starts[0]) if starts else None
        for k in range(len(starts)):
            host, ahead = ahead.result(), None
            staged, host = sharding.put_batch(host, chunk_sharding), None  # the host copy goes before the next read
            ahead = pool.submit(gather, starts[k + 1]) if k + 1 < len(starts) else None
            yield staged
            staged = None  # resumed when the loop wants the next chunk: this one can go first
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
