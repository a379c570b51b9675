"""Data parallelism: one mesh axis, 'data'; the batch is split over it and the
train state is replicated. The same code runs on one CPU, several CPU host
devices, GPUs or TPUs; with one device it costs nothing.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnn.config import ConfigError


def set_cpu_devices(num_devices: int) -> None:
    """Splits the CPU into host devices, one per core unless `num_devices` > 0.

    XLA runs a CNN's backward pass mostly on one core; data parallelism over
    host devices uses them all. Must run before JAX first touches a device;
    later it is silently too late, so callers do it first thing.
    """
    count = num_devices or os.cpu_count() or 1
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        pass  # the backend is already up (e.g. a notebook that ran JAX before); keep its devices


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh over the first `num_devices` local devices (all if 0)."""
    devices = jax.local_devices()
    if num_devices > len(devices):
        raise ConfigError(f"train.num_devices={num_devices} but only {len(devices)} {devices[0].platform} "
                          f"device(s) are available; use 0 for all of them")
    return Mesh(np.array(devices[:num_devices or len(devices)]), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch(field: str, batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise ConfigError(f"{field}={batch_size} does not divide over {mesh.size} devices; use a multiple of "
                          f"{mesh.size}, or set train.num_devices to a divisor of it")
