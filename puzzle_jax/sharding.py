"""Device mesh, array placement and process barriers: the one place that knows how data and state are laid out on
devices and how the processes of a multi-host run keep in step.

Data parallelism over a 1-D mesh whose only axis is ``'data'``: batches are split along their first axis, the
training state is replicated. Each process hands in only its own slice of the global batch
(``jax.make_array_from_process_local_data``), so the same code runs on one CPU, one GPU, or a TPU pod.

Between processes, barriers, process 0's outcome and small texts go through JAX's coordination service (its
key-value store and barriers, which take timeouts) rather than through device collectives, which wait forever: a
process that fails or is gone makes the others fail with a message naming the place, after at most
``barrier_timeout_s`` (``configure_barriers``), instead of hanging.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, TypeVar

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


# How long a process waits for the others (a barrier, process 0's outcome, the others' texts) before failing
# (configure_barriers).
_barrier_timeout_s = 3600.0
# Uses of each name so far: every process makes the same calls in the same order, so name + count is one key for
# all of them, and a name can be used again (each stage's barrier, each checkpoint's gather).
_USES: collections.Counter = collections.Counter()

_Result = TypeVar("_Result")


class ProcessesOutOfStepError(RuntimeError):
    """Another process failed, or did not reach a meeting point within the barrier timeout."""


def configure_barriers(timeout_s: float) -> None:
    """Sets how long a process waits for the others at every meeting point (``config.barrier_timeout_minutes``)."""
    global _barrier_timeout_s
    if not timeout_s > 0:
        raise ValueError(f"the barrier timeout must be > 0 seconds; got {timeout_s}.")
    _barrier_timeout_s = float(timeout_s)


def _timeout_ms() -> int:
    return int(_barrier_timeout_s * 1000)


def _coordination_client() -> Any:
    """JAX's distributed-runtime client. Not public API (pinned JAX versions), so it is reached here only."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("a multi-process run without jax.distributed.initialize()")
    return client


def _key(name: str) -> str:
    _USES[name] += 1
    return f"puzzle_jax/{name}/{_USES[name]}"


def _out_of_step(name: str, what: str, error: Exception) -> ProcessesOutOfStepError:
    return ProcessesOutOfStepError(
        f"process {jax.process_index()} of {jax.process_count()} waited {_barrier_timeout_s:.0f} s at "
        f"'{name}' for {what}: another process failed or is gone (see its log), or is slower than "
        f"config.barrier_timeout_minutes allows. ({type(error).__name__}: {str(error).splitlines()[0][:300]})"
    )


def wait_for_all_processes(name: str) -> None:
    """Blocks until every JAX process of the run has reached the barrier ``name``; returns at once in a one-process
    run. Use it where one process's files must be complete before another reads them.

    Raises:
      ProcessesOutOfStepError: not every process arrived within the barrier timeout.
    """
    if jax.process_count() == 1:
        return
    key = _key(name)
    try:
        _coordination_client().wait_at_barrier(key, _timeout_ms())
    except Exception as error:  # jax's XlaRuntimeError (DEADLINE_EXCEEDED, a process that left), by message
        raise _out_of_step(name, "every process", error) from error


def first_on_process_zero(name: str, function: Callable[[], _Result]) -> _Result:
    """Runs ``function`` on process 0, then on the others once it has succeeded there (preparing a dataset that
    every process then opens: concurrent preparations of one shared folder would race).

    Raises:
      whatever ``function`` raised, on process 0; on the others ``ProcessesOutOfStepError`` with the same
      message, or after the barrier timeout.
    """
    if jax.process_count() == 1:
        return function()
    key, client = _key(name), _coordination_client()
    if jax.process_index() == 0:
        try:
            result = function()
        except BaseException as error:
            client.key_value_set(key, f"{type(error).__name__}: {error}")
            raise
        client.key_value_set(key, "")
        return result
    try:
        failure = client.blocking_key_value_get(key, _timeout_ms())
    except Exception as error:
        raise _out_of_step(name, "process 0", error) from error
    if failure:
        raise ProcessesOutOfStepError(f"process 0 failed at '{name}': {failure}")
    return function()


def gather_texts(name: str, text: str) -> list[str]:
    """Every process's ``text``, in process order (each process's data-iterator state, for process 0 to save).

    Raises:
      ProcessesOutOfStepError: some process did not contribute within the barrier timeout.
    """
    if jax.process_count() == 1:
        return [text]
    key, client = _key(name), _coordination_client()
    client.key_value_set(f"{key}/{jax.process_index()}", text)
    try:
        return [
            client.blocking_key_value_get(f"{key}/{index}", _timeout_ms())
            for index in range(jax.process_count())
        ]
    except Exception as error:
        raise _out_of_step(name, "the other processes' states", error) from error


def device_memory_limit() -> int | None:
    """Bytes one of this process's devices can hold (all devices of a run are alike), or None where the backend does
    not say (CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def same_on_all_processes(flag: bool) -> bool:
    """Process 0's ``flag`` on every process: a decision that changes the compiled program must be the same on all
    processes of a run, or their collectives would not match. Through ``gather_texts``, so a missing process
    fails it after the barrier timeout like every other meeting."""
    return gather_texts("same on all processes", "1" if flag else "")[0] == "1"
