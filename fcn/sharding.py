"""One 1-D `data` mesh over every device, from the first day.

Batches are split over the `data` axis; parameters and optimizer state are
replicated. On one device this costs nothing, and many devices or many hosts
are then a matter of launching, not of code.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh() -> Mesh:
    """A mesh with one axis, `data`, over all devices of all processes."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, other axes whole."""
    return NamedSharding(mesh, P("data"))


def check_batch_size(global_batch: int, what: str = "batch_size") -> int:
    """The per-device batch; a clear error when the global batch does not divide.

    what: the config key that set it (`config.` is put before it), or a flag (`--batch_size`).
    """
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if global_batch < 1 or global_batch % n_dev:
        name = what if what.startswith("-") else f"config.{what}"
        raise ValueError(
            f"{name}={global_batch} must be a positive multiple of the device count "
            f"({n_dev} devices over {n_proc} process(es)); try {max(n_dev, global_batch // n_dev * n_dev)}"
        )
    return global_batch // n_dev


def round_up_to_devices(global_batch: int) -> int:
    """The smallest multiple of the device count that is at least `global_batch` (and at least 1)."""
    n_dev = jax.device_count()
    return max(1, -(-global_batch // n_dev)) * n_dev


def process_slice(global_batch: int) -> slice:
    """The rows of a global batch that this process feeds."""
    per_process = global_batch // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def put_batch(mesh: Mesh, *arrays: np.ndarray):
    """Place this process's rows of a global batch on the mesh, split over `data`."""
    sharding = batch_sharding(mesh)
    return tuple(jax.make_array_from_process_local_data(sharding, a) for a in arrays)
