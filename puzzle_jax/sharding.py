"""Device mesh and array placement: the one place that knows how data and state are laid out on devices.

Data parallelism over a 1-D mesh whose only axis is ``'data'``: batches are split along their first axis, the
training state is replicated. Each process hands in only its own slice of the global batch
(``jax.make_array_from_process_local_data``), so the same code runs on one CPU, one GPU, or a TPU pod.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """Returns a 1-D ``('data',)`` mesh over the first ``num_devices`` devices (all devices when None)."""
    available = jax.device_count()
    count = available if num_devices in (None, 0) else num_devices
    if count < 1 or count > available:
        raise ValueError(
            f"mesh.num_devices={num_devices} is not possible: {available} device(s) are visible "
            "(use 0 for all of them)."
        )
    devices = np.asarray(jax.devices()[:count])
    return jax.sharding.Mesh(devices, (DATA_AXIS,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (parameters, optimizer state)."""
    return NamedSharding(mesh, P())


def data_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the ``'data'`` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh, field: str) -> None:
    """Raises a clear error when a batch cannot be split evenly over the mesh and the processes."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise ValueError(
            f"{field}={global_batch_size} must be divisible by the number of devices in the mesh ({devices})."
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"{field}={global_batch_size} must be divisible by the number of processes ({jax.process_count()})."
        )


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Assembles each process's local slice of a batch into global arrays sharded along ``'data'``."""
    sharding = data_sharded(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in batch.items()}


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Places a pytree of arrays on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
