"""Stages that write one file per image of a split: this process's share, resumable, atomic, with progress.

``infer_cam`` (and the refinement and segmentation stages) compute something per image and write it to
``output_path(id)``. ``write_per_image`` gives each process every N-th image (every image exactly once over the
processes), skips images whose file exists (an interrupted run resumes where it stopped), writes each file through
the caller's atomic writer, and draws a progress bar with images/s on process 0.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
from tqdm import tqdm


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
      source: the split's records (``id`` and whatever ``compute`` reads).
      output_path: ``id -> the file of that image's output``.
      compute: ``records -> (id, result)`` pairs, for the records it is given (in any order, each once); it may
        batch them.
      write: ``(path, result) -> None``, writing atomically.
      description: the progress bar's label.

    Returns:
      ``{"written": ..., "skipped_existing": ...}`` for this process.
    """
    indices = range(jax.process_index(), len(source), jax.process_count())
    progress = tqdm(total=len(indices), desc=description, disable=jax.process_index() != 0, dynamic_ncols=True)
    counts = {"written": 0, "skipped_existing": 0}

    def pending_records() -> Iterator[dict[str, Any]]:
        for index in indices:
            record = source[index]
            if os.path.exists(output_path(record["id"])):
                counts["skipped_existing"] += 1  # complete from an earlier run
                progress.update(1)
                continue
            yield record

    started = time.perf_counter()
    try:
        for image_id, result in compute(pending_records()):
            write(output_path(image_id), result)
            counts["written"] += 1
            progress.update(1)
            progress.set_postfix(
                images_per_second=f"{counts['written'] / (time.perf_counter() - started):.1f}", refresh=False
            )
    finally:
        progress.close()
    return counts
