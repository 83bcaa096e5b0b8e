"""Stages that write one file per image of a split: this process's share, resumable, atomic, with progress.

``infer_cam`` (and the refinement and segmentation stages) compute something per image and write it to
``output_path(id)``. ``write_per_image`` gives each process every N-th image (every image exactly once over the
processes), skips images whose file exists (an interrupted run resumes where it stopped), removes the temporaries a
killed run left in the output folder (``fileio.remove_leftover_temporaries``), writes each file through the caller's
atomic writer, names the image and its file in any failure, and reports progress with images/s on process 0.

Host-CPU work (the dense CRF of the label stages) runs in a process pool: ``compute_in_processes`` turns a picklable
per-image function into a ``compute`` for ``write_per_image``. Its workers are started with "spawn": the parent has
JAX and its threads loaded, and forking such a process is unsafe. At most two jobs per worker are in flight (each
worker always has the next one queued, and a split of 10k images is not submitted at once); results come back in
completion order and the parent writes each one atomically as soon as it arrives, so a killed run keeps every
finished image and leaves no partial file. A worker that dies (killed, out of memory) fails the stage with the ids
of the images that were in flight; a rerun finishes the rest.

Where that work runs is the stage's choice, not its code's: ``host_compute`` gives the ``compute`` of a
``HostBackend`` (``config.refine.backend``): ``local``, the process pool above, or ``ray``, tasks on a Ray instance
or cluster (``ray_backend.compute_on_ray``, imported only then). Both return the function's results, so the files
are the same whichever ran them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import jax

from puzzle_jax import fileio, progress, sharding


def write_per_image(
    source: Sequence[dict[str, Any]],
    *,
    output_path: Callable[[str], str],
    compute: Callable[[Iterator[dict[str, Any]]], Iterable[tuple[str, Any]]],
    write: Callable[[str, Any], None],
    description: str,
) -> dict[str, int]:
    """Computes and writes the outputs of this process's images that have none yet.

    Args:
      source: the split's records (``id`` and whatever ``compute`` reads); with an ``ids()`` method (the split's ids
        in record order, read without decoding), finished images are skipped without being decoded.
      output_path: ``id -> the file of that image's output``.
      compute: ``records -> (id, result)`` pairs, for the records it is given (in any order, each once); it may
        batch them.
      write: ``(path, result) -> None``, writing atomically.
      description: the progress bar's label.

    Returns:
      ``{"written": ..., "skipped_existing": ...}`` summed over the processes; with several processes also
      ``"written_by_process"``, each process's count.
    """
    indices = range(jax.process_index(), len(source), jax.process_count())
    shown = progress.Progress(len(indices), description=description, enabled=jax.process_index() == 0)
    counts = {"written": 0, "skipped_existing": 0}

    # A split that lists its ids without decoding (datasets.DecodedRecords) lets a resumed run skip finished images
    # without decoding them; listing costs a read of the split, so only when the output folder holds something.
    output_dir = os.path.dirname(output_path("any"))
    fileio.remove_leftover_temporaries(output_dir)
    resuming = os.path.isdir(output_dir) and any(True for _ in os.scandir(output_dir))
    ids = source.ids() if resuming and hasattr(source, "ids") else None

    def pending_records() -> Iterator[dict[str, Any]]:
        for index in indices:
            if ids is not None and os.path.exists(output_path(ids[index])):
                counts["skipped_existing"] += 1  # complete from an earlier run
                shown.update(1)
                continue
            record = source[index]
            if ids is None and os.path.exists(output_path(record["id"])):
                counts["skipped_existing"] += 1
                shown.update(1)
                continue
            yield record

    started = time.perf_counter()
    try:
        for image_id, result in compute(pending_records()):
            try:
                write(output_path(image_id), result)
            except Exception as error:
                error.add_note(f"(while writing image {image_id!r} to {output_path(image_id)})")
                raise
            counts["written"] += 1
            shown.update(1)
            shown.set_postfix(images_per_second=f"{counts['written'] / (time.perf_counter() - started):.1f}")
    finally:
        shown.close()
    if jax.process_count() == 1:
        return counts
    by_process = [json.loads(text) for text in sharding.gather_texts(f"{description} counts", json.dumps(counts))]
    return {
        "written": sum(each["written"] for each in by_process),
        "skipped_existing": sum(each["skipped_existing"] for each in by_process),
        "written_by_process": [each["written"] for each in by_process],
    }


# Jobs in flight per worker: one running and one queued keeps every worker busy while the parent prepares the next.
_JOBS_PER_WORKER = 2


class WorkerDiedError(RuntimeError):
    """A worker process of ``compute_in_processes`` died (killed, out of memory) while images were in flight.

    Attributes:
      image_ids: the ids of the images that were in flight, one of which killed it; none of them was written.
    """

    def __init__(self, image_ids: Sequence[str]):
        self.image_ids = list(image_ids)
        super().__init__(
            f"a worker process died (killed or out of memory) while working on image(s) {self.image_ids}; the "
            "images finished before are written; rerun the stage to finish the rest."
        )


def resolve_workers(workers: int) -> int:
    """The number of worker processes for a ``workers`` setting: itself, or the CPU cores this process may use
    for 0."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = the CPU cores); got {workers}.")
    return workers or len(os.sched_getaffinity(0))


def compute_in_processes(
    function: Callable[[Any], Any],
    *,
    prepare: Callable[[dict[str, Any]], Any],
    workers: int,
) -> Callable[[Iterator[dict[str, Any]]], Iterator[tuple[str, Any]]]:
    """A ``compute`` for ``write_per_image`` that runs ``function`` on each record in a pool of processes.

    Args:
      function: ``job -> result``, picklable (a module-level function or a ``functools.partial`` of one); it runs
        in a fresh process, so its module should import little (no JAX).
      prepare: ``record -> job``, run in the parent: what ``function`` needs of the record, cheap to pickle.
      workers: processes (0 = the CPU cores).

    Returns:
      ``records -> (id, result)`` pairs in completion order.

    Raises (from the returned generator):
      WorkerDiedError: a worker process died; names the images in flight.
      Exception: whatever ``function`` raised for an image, as it raised it, with a note naming the image.
    """
    count = resolve_workers(workers)

    def compute(records: Iterator[dict[str, Any]]) -> Iterator[tuple[str, Any]]:
        pool = concurrent.futures.ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"))
        in_flight: dict[concurrent.futures.Future, str] = {}
        pending = iter(records)
        try:
            while True:
                for record in pending:
                    in_flight[pool.submit(function, prepare(record))] = record["id"]
                    if len(in_flight) >= _JOBS_PER_WORKER * count:
                        break
                if not in_flight:
                    return
                done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                # Results first: a pool broken by one dead worker fails all its other futures, not the finished ones.
                for future in sorted(done, key=lambda future: future.exception() is not None):
                    try:
                        result = future.result()
                    except BrokenProcessPool as error:
                        raise WorkerDiedError(sorted(in_flight.values())) from error
                    except Exception as error:
                        error.add_note(f"(while computing image {in_flight[future]!r} in a worker process)")
                        raise
                    yield in_flight.pop(future), result
        finally:
            # On an error (or a consumer that stops early) queued jobs are dropped; running ones finish first.
            pool.shutdown(wait=True, cancel_futures=True)

    return compute


# The values of config.refine.backend.
HOST_BACKENDS = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class HostBackend:
    """Where the host-CPU per-image work of a stage runs (``host_compute``).

    Attributes:
      kind: ``"local"`` (a pool of processes on this machine) or ``"ray"`` (Ray tasks).
      workers: local: processes; ray: CPUs to keep busy (a started Ray instance gets this many); 0 = the CPU cores
        (ray: all the CPUs of the instance or cluster).
      ray_address: ray: ``""`` starts a Ray instance on this machine, ``"auto"`` or ``host:port`` joins a cluster.
      max_retries: ray: reruns of a failed task before its image is reported.
    """

    kind: str = "local"
    workers: int = 0
    ray_address: str = ""
    max_retries: int = 3

    def __post_init__(self):
        if self.kind not in HOST_BACKENDS:
            raise ValueError(f"refine.backend must be one of {list(HOST_BACKENDS)}; got {self.kind!r}.")

    @classmethod
    def from_config(cls, refine: Any, workers: int | None = None) -> HostBackend:
        """The backend of ``config.refine`` (``backend``, ``ray_address``, ``max_retries``, ``workers``); ``workers``
        overrides the section's (``infer_seg`` sizes its pool with ``seg.workers``)."""
        return cls(
            kind=str(refine.backend),
            workers=int(refine.workers if workers is None else workers),
            ray_address=str(refine.ray_address),
            max_retries=int(refine.max_retries),
        )


def host_compute(
    function: Callable[[Any], Any], *, prepare: Callable[[dict[str, Any]], Any], backend: HostBackend
) -> Callable[[Iterator[dict[str, Any]]], Iterator[tuple[str, Any]]]:
    """A ``compute`` for ``write_per_image`` that runs ``function`` on each record where ``backend`` says.

    Args:
      function: ``job -> result``, picklable, its module importable without JAX (``compute_in_processes``).
      prepare: ``record -> job``, run in this process.
      backend: ``local`` (``compute_in_processes``) or ``ray`` (``ray_backend.compute_on_ray``; Ray is imported
        only then).

    Returns:
      ``records -> (id, result)`` pairs in completion order, the same results whichever backend.
    """
    if backend.kind == "ray":
        from puzzle_jax import ray_backend

        return ray_backend.compute_on_ray(
            function,
            prepare=prepare,
            address=backend.ray_address,
            workers=backend.workers,
            max_retries=backend.max_retries,
        )
    return compute_in_processes(function, prepare=prepare, workers=backend.workers)
