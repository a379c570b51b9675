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
    """Splits the CPU into `num_devices` host devices (one if 0).

    XLA runs a CNN's backward pass mostly on one core, so on 2 cores two host
    devices train the MNIST CNN ~2x faster. It is not the default: with
    jaxlib 0.10.2 on a 2-core machine, XLA's in-process CPU all-reduce hung
    in about half of the runs (one device waits forever at the rendezvous
    and XLA aborts after 40 s). Must run before JAX first touches a device;
    after that the devices are fixed and this leaves them.
    """
    try:
        jax.config.update("jax_num_cpu_devices", max(num_devices, 1))
    except RuntimeError:
        pass  # the backend is already up (e.g. a notebook that ran JAX before)


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
