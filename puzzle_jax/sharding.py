"""Device mesh, array placement and process barriers: the one place that knows how data and state are laid out on
devices and how the processes of a multi-host run keep in step.

Data parallelism over a 1-D mesh whose only axis is ``'data'``: batches are split along their first axis, the
training state is replicated. Each process hands in only its own slice of the global batch
(``jax.make_array_from_process_local_data``), so the same code runs on one CPU, one GPU, or a TPU pod.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """Returns a 1-D ``('data',)`` mesh over the first ``num_devices`` devices of all processes (all when None or 0).

    Every process must then run the same computations on it in the same order (training steps).
    """
    return _mesh_over(jax.devices(), num_devices)


def create_local_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A ``('data',)`` mesh over this process's own devices (the first ``num_devices``; all when None or 0).

    For work the processes split between them and run independently (CAM inference: each process its share of the
    images, hence its own number and shapes of calls), which a mesh spanning processes would turn into collectives
    that the processes do not enter together. With one process it is ``create_mesh``'s mesh.
    """
    return _mesh_over(jax.local_devices(), num_devices)


def _mesh_over(devices: list, num_devices: int | None) -> jax.sharding.Mesh:
    available = len(devices)
    count = available if num_devices in (None, 0) else num_devices
    if count < 1 or count > available:
        raise ValueError(
            f"mesh.num_devices={num_devices} is not possible: {available} device(s) are visible "
            "(use 0 for all of them)."
        )
    # Auto axes: the step's shardings are given on its inputs and outputs, and XLA propagates them through the
    # model (jax.make_mesh's default, Explicit, would put the batch sharding into every intermediate's type).
    return jax.make_mesh((count,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:count])


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


def wait_for_all_processes(name: str) -> None:
    """Blocks until every JAX process of the run has reached the barrier ``name``; returns at once in a one-process
    run. Use it where one process's files must be complete before another reads them."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def device_memory_limit() -> int | None:
    """Bytes one of this process's devices can hold (all devices of a run are alike), or None where the backend does
    not say (CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def same_on_all_processes(flag: bool) -> bool:
    """Process 0's ``flag`` on every process: a decision that changes the compiled program must be the same on all
    processes of a run, or their collectives would not match."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))
