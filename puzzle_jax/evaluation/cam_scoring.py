"""Scoring CAM files (``cam_files``) against ground truth with the background-threshold sweep (spec §6).

Shared by the ``eval_cam`` stage (ground truth from the split's masks, part maps from its records where the dataset
has them) and the standalone evaluator (ground truth and part maps from folders of PNGs): one confusion matrix per
threshold over all images, and the part recall where part maps are given (``miou.ThresholdSweep``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from puzzle_jax import cam_files, progress
from puzzle_jax.evaluation import miou


class ScoredImage(NamedTuple):
    """One image to score: its CAM file, its ground truth, where that comes from, and its part map if any.

    A plain ``(cam_path, ground_truth, ground_truth_source)`` tuple is one without a part map.
    """

    cam_path: str
    ground_truth: np.ndarray
    ground_truth_source: str
    parts: np.ndarray | None = None


def sweep_cam_files(
    pairs: Iterable[ScoredImage | tuple],
    *,
    num_classes: int,
    thresholds: Sequence[float],
    total: int | None = None,
    show_progress: bool = True,
    description: str = "evaluate",
) -> dict[str, Any]:
    """Scores CAM files at every background threshold.

    Args:
      pairs: a ``ScoredImage`` per image (CAM file, ground-truth label map (H, W), where the ground truth comes
        from, for error messages, and optionally a part map (H, W)), or the first three as a tuple.
      num_classes: classes including background.
      thresholds: background scores to try.
      total: number of pairs, for the progress bar.
      show_progress: draw a progress bar.
      description: the progress bar's label.

    Returns:
      ``miou.ThresholdSweep.result()`` (with the part recall when some image had a part map).

    Raises:
      ValueError: an unreadable CAM file or one with NaN/Inf values, maps whose size differs from their ground truth,
        a class id out of range in its keys or its ground truth (the CAM file and the ground truth named), or a
        part map of another size than its ground truth.
    """
    sweep = miou.ThresholdSweep(num_classes, thresholds)
    for item in progress.track(pairs, total=total, description=description, enabled=show_progress):
        cam_path, ground_truth, ground_truth_source, parts = ScoredImage(*item)
        cams, keys = cam_files.read_score_maps(cam_path)
        if cams.shape[1:] != ground_truth.shape:
            raise ValueError(
                f"{cam_path}: CAM size {cams.shape[1:]} differs from its ground truth {ground_truth_source} "
                f"{ground_truth.shape}."
            )
        if parts is not None and parts.shape != ground_truth.shape:
            raise ValueError(
                f"{cam_path}: the part map of size {parts.shape} differs from its ground truth {ground_truth_source} "
                f"{ground_truth.shape}."
            )
        try:
            sweep.update(cams, keys, ground_truth, parts)
        except ValueError as error:
            # Out-of-range class ids in the keys or the ground truth: name both sources.
            raise ValueError(f"{cam_path} against {ground_truth_source}: {error}") from error
    return sweep.result()


def sweep_split(
    source: Sequence[dict[str, Any]],
    cam_dir: str,
    *,
    num_classes: int,
    thresholds: Sequence[float],
    produced_by: str,
    show_progress: bool = True,
    description: str = "evaluate",
) -> dict[str, Any]:
    """``sweep_cam_files`` for every image of a split (ground truth: its ``mask``; part map: its ``parts`` where the
    dataset has them), CAM files from ``cam_dir``.

    Raises:
      FileNotFoundError: some images have no CAM file (the count and the first are named, with ``produced_by``,
        the stage that writes them), checked before any file is read.
    """
    paths = [cam_files.path_of(cam_dir, image_id) for image_id in source.ids()]
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        first = ", ".join(os.path.basename(path) for path in missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} of {len(source)} CAM files are missing in {cam_dir} (first: {first}); run {produced_by} "
            "first."
        )
    pairs = (
        ScoredImage(
            cam_files.path_of(cam_dir, record["id"]), record["mask"], f"(the mask of image {record['id']!r})",
            record.get("parts"),
        )
        for record in source
    )
    return sweep_cam_files(
        pairs,
        num_classes=num_classes,
        thresholds=thresholds,
        total=len(source),
        show_progress=show_progress,
        description=description,
    )
