"""Data parallelism: one mesh axis, 'data'; every batch is split over it and
the train state is replicated. The same code runs on one CPU, a CPU split
into host devices (cnn/runtime.py), GPUs, TPUs, and several processes (hosts).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnn.errors import ConfigError


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D 'data' mesh: the first `num_devices` local devices (all if 0), or every device of every process."""
    if jax.process_count() > 1:
        if num_devices not in (0, jax.local_device_count()):
            raise ConfigError(f"train.num_devices={num_devices}: a multi-process run uses every device of every "
                              f"process; set train.num_devices=0")
        return Mesh(np.array(jax.devices()), ("data",))
    devices = jax.local_devices()
    if num_devices > len(devices):
        raise ConfigError(f"train.num_devices={num_devices} but only {len(devices)} {devices[0].platform} "
                          f"device(s) are available; use 0 for all of them")
    return Mesh(np.array(devices[:num_devices or len(devices)]), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the first axis (the examples) over the mesh."""
    return NamedSharding(mesh, PartitionSpec("data"))


def chunk_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the second axis over the mesh: a chunk of batches, [steps, batch, ...], each batch split as above."""
    return NamedSharding(mesh, PartitionSpec(None, "data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch(field: str, batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise ConfigError(f"{field}={batch_size} does not divide over {mesh.size} devices; use a multiple of "
                          f"{mesh.size}, or set train.num_devices to a divisor of it")


CPU_MICRO_BATCH = 64  # examples per device per compiled call, at most, in a CPU's default


def micro_batch_size(batch_size: int, mesh: Mesh, whole: bool = False) -> int:
    """The default `train.micro_batch_size`: on CPUs, parts of at most 64 examples per device; else the batch.

    Past about 64 images per call XLA:CPU's step gets slower per image
    (docs/devices.md); GPUs and TPUs want the whole batch in one call, and
    so do oneDNN's bf16 kernels on a CPU (`whole`: cnn.kernels.whole_batch). A
    batch that does not split evenly stays whole.
    """
    if whole or mesh.devices.flat[0].platform != "cpu":
        return batch_size
    per_device = batch_size // mesh.size
    parts = -(-per_device // CPU_MICRO_BATCH)
    return batch_size // parts if per_device % parts == 0 else batch_size


def process_slice(batch_size: int) -> slice:
    """The columns of a global batch that this process feeds to its own devices."""
    per_process = batch_size // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def put_batch(arrays: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host arrays onto the mesh, split over the batch axis `sharding` names (`batch_sharding`, `chunk_sharding`).

    In a multi-process run each process passes only its own part of the
    global batch (`process_slice`) and the parts form one global array.
    """
    if jax.process_count() == 1:
        return jax.device_put(arrays, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in arrays.items()}


def put_replicated(tree, mesh: Mesh):
    """A host (or single-device) tree copied to every device of the mesh, across processes too."""
    if jax.process_count() == 1:
        return jax.device_put(tree, replicated(mesh))

    def leaf(x):
        if _is_key(x):  # typed PRNG keys travel as their raw data
            return jax.random.wrap_key_data(leaf(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(replicated(mesh), np.asarray(x))

    return jax.tree_util.tree_map(leaf, tree)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_host(tree):
    """A replicated device tree as numpy, in every process (no cross-process gather needed). An explicit transfer
    (jax.device_get): allowed where jax.transfer_guard disallows implicit ones."""
    def leaf(x):
        if not isinstance(x, jax.Array):
            return x
        return x.addressable_data(0) if _is_key(x) else jax.device_get(x.addressable_data(0))

    return jax.tree_util.tree_map(leaf, tree)
