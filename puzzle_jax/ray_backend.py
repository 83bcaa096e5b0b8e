"""Host-CPU per-image work on Ray: ``compute_on_ray``, the ``ray`` backend of ``per_image.host_compute``.

The only module that imports Ray, and only when a stage chooses it (``config.refine.backend="ray"``): Ray is an
optional extra (``pip install -r requirements-ray.txt`` or ``pip install 'puzzle_jax[ray]'``). The driver (the stage's
process) keeps everything that makes a stage resumable and safe to kill: ``per_image.write_per_image`` lists the
images without an output, draws the progress bar and writes each result atomically as it arrives; Ray only runs the
per-image function, one task per image, on any CPU of the cluster. So the outputs are the function's results, the
same bit for bit as the process pool's.

* Where: ``address=""`` starts a Ray instance on this machine (shut down at the end); ``"auto"`` or ``host:port``
  joins a running cluster (only this driver's connection is closed at the end, never the cluster). A process that
  is already connected (``ray.init`` called before) uses that connection.
* Code: the driver's ``puzzle_jax`` package is shipped to the workers (Ray's ``runtime_env`` ``py_modules``), so
  they run the driver's code whatever is installed on the nodes; its dependencies (``requirements.txt``: numpy,
  pydensecrf2, ...) must be installed on every node. The per-image functions and this module import no JAX.
* Data: a task gets the prepared job (for the label stages: a score file's path and the image's pixels), its arrays
  writable as a pool's workers get them; a path must name the same file on every node (the workdir on a shared file
  system, mounted at the same path).
* Flow: at most two tasks per CPU are in flight (not the whole split at once); results come back in completion order.
* Failures: Ray reruns a task whose worker died (``max_retries``) and one that raised (``retry_exceptions``), up to
  ``max_retries`` times. An image whose task failed on every attempt stops the submission of new ones; the tasks in
  flight finish and are written, then ``RayTaskFailedError`` names each failed image and its last error. A rerun
  of the stage finishes the rest.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

# What to run when Ray is missing.
INSTALL_HINT = "pip install -r requirements-ray.txt (or pip install 'puzzle_jax[ray]')"

# Tasks in flight per CPU: one running and one queued keeps every CPU busy while the driver prepares the next.
_TASKS_PER_CPU = 2


class RayTaskFailedError(RuntimeError):
    """Images whose Ray task failed on every attempt (an exception, a dead worker or node).

    Attributes:
      errors: image id -> the last error of its task (Ray's ``RayTaskError`` wraps the function's exception and
        carries the worker's traceback), in the order they failed.
      image_ids: the failed images' ids; none of them was written.
    """

    def __init__(self, errors: Mapping[str, BaseException], attempts: int):
        self.errors = dict(errors)
        self.image_ids = list(self.errors)
        first_id, first_error = next(iter(self.errors.items()))
        super().__init__(
            f"the Ray task of image(s) {self.image_ids} failed on all {attempts} attempt(s) (1 + refine.max_retries); "
            "the images finished before are written; rerun the stage to finish the rest. The last error of image "
            f"{first_id!r}: {first_error}"
        )


def import_ray():
    """Ray, imported; an ``ImportError`` that says how to install it when it is missing."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(f"refine.backend='ray' needs Ray, which is not installed: {INSTALL_HINT}.") from error
    return ray


def start_or_join(address: str, num_cpus: int) -> bool:
    """Connects this process to Ray, unless it is connected already.

    Args:
      address: ``""`` starts a Ray instance on this machine; ``"auto"`` or ``host:port`` joins a running cluster.
      num_cpus: the CPUs of a started instance (ignored when joining).

    Returns:
      Whether this call connected (then the caller disconnects with ``ray.shutdown()``, which stops a started
      instance and leaves a cluster running).
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    import puzzle_jax

    # The driver's code on every worker, whatever puzzle_jax (if any) the nodes have installed.
    runtime_env = {"py_modules": [os.path.dirname(os.path.abspath(puzzle_jax.__file__))]}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        # "local": a new instance even where `ray start` runs a cluster or RAY_ADDRESS is set (ray.init() joins those).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
    return True


@contextlib.contextmanager
def _connected(address: str, num_cpus: int) -> Iterator[Any]:
    ray = import_ray()
    started = start_or_join(address, num_cpus)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _writable(job: Any) -> Any:
    """``job`` with its read-only arrays copied: Ray hands a task the object store's arrays without a copy, read-only,
    and some functions need to write (pydensecrf takes the image as a writable buffer), as a pool's unpickled ones
    are."""
    if isinstance(job, np.ndarray) and not job.flags.writeable:
        return job.copy()
    if isinstance(job, (tuple, list)):
        return type(job)(_writable(part) for part in job)
    if isinstance(job, dict):
        return {key: _writable(value) for key, value in job.items()}
    return job


def _call(function: Callable[[Any], Any], job: Any) -> Any:
    # The task Ray runs: module-level, so a worker imports it with this module (which imports nothing heavy).
    return function(_writable(job))


def compute_on_ray(
    function: Callable[[Any], Any],
    *,
    prepare: Callable[[dict[str, Any]], Any],
    address: str = "",
    workers: int = 0,
    max_retries: int = 3,
) -> Callable[[Iterator[dict[str, Any]]], Iterator[tuple[str, Any]]]:
    """A ``compute`` for ``per_image.write_per_image`` that runs ``function`` on each record as a Ray task.

    The same contract as ``per_image.compute_in_processes``, whose outputs it reproduces bit for bit.

    Args:
      function: ``job -> result``, picklable (a module-level function or a ``functools.partial`` of one) and
        importable on the workers without JAX.
      prepare: ``record -> job``, run in the driver: what ``function`` needs of the record (paths and settings,
        the image's pixels); paths must be valid on every node.
      address: ``""`` starts a Ray instance on this machine; ``"auto"`` or ``host:port`` joins a running cluster.
      workers: CPUs to keep busy (each task takes one; two tasks per CPU are in flight); 0 = all the CPUs of the Ray
        instance. A started instance gets this many CPUs (0: this machine's cores).
      max_retries: reruns of a failed task (an exception or a dead worker) before its image is reported.

    Returns:
      ``records -> (id, result)`` pairs in completion order; Ray starts (or is joined) when it is iterated.

    Raises (from the returned generator):
      ImportError: Ray is not installed (says how to install it).
      RayTaskFailedError: images whose task failed on every attempt, with their last errors; the results of the
        other tasks in flight are yielded first.
    """
    if workers < 0 or max_retries < 0:
        raise ValueError(f"workers and max_retries must be >= 0; got {workers} and {max_retries}.")

    def compute(records: Iterator[dict[str, Any]]) -> Iterator[tuple[str, Any]]:
        with _connected(address, workers or len(os.sched_getaffinity(0))) as ray:
            task = ray.remote(_call).options(num_cpus=1, max_retries=max_retries, retry_exceptions=True)
            limit = _TASKS_PER_CPU * (workers or max(1, int(ray.cluster_resources().get("CPU", 1))))
            in_flight: dict[Any, str] = {}
            failed: dict[str, BaseException] = {}
            pending = iter(records)
            try:
                while True:
                    if not failed:  # after a final failure, only the tasks in flight finish
                        for record in pending:
                            in_flight[task.remote(function, prepare(record))] = record["id"]
                            if len(in_flight) >= limit:
                                break
                    if not in_flight:
                        break
                    done, _ = ray.wait(list(in_flight), num_returns=1)
                    for reference in done:
                        image_id = in_flight.pop(reference)
                        try:
                            result = ray.get(reference)
                        except Exception as error:  # Ray has retried it max_retries times
                            failed[image_id] = error
                            continue
                        yield image_id, result
            finally:
                # A consumer that stops early (an error writing a result): drop the tasks it will not collect.
                for reference in in_flight:
                    with contextlib.suppress(Exception):
                        ray.cancel(reference)
            if failed:
                raise RayTaskFailedError(failed, attempts=max_retries + 1) from next(iter(failed.values()))

    return compute
