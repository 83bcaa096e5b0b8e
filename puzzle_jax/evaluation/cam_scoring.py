"""Scoring CAM files (``cam_files``) against ground truth with the background-threshold sweep (spec §6).

Shared by the ``eval_cam`` stage (ground truth from the split's masks) and the standalone evaluator (ground truth
from a folder of PNGs): one confusion matrix per threshold over all images (``miou.ThresholdSweep``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from puzzle_jax import cam_files
from puzzle_jax.evaluation import miou


def sweep_cam_files(
    pairs: Iterable[tuple[str, np.ndarray, str]],
    *,
    num_classes: int,
    thresholds: Sequence[float],
    total: int | None = None,
    show_progress: bool = True,
    description: str = "evaluate",
) -> dict[str, Any]:
    """Scores CAM files at every background threshold.

    Args:
      pairs: ``(CAM file, ground-truth label map (H, W), where the ground truth comes from)`` per image; the last
        names the ground truth in error messages.
      num_classes: classes including background.
      thresholds: background scores to try.
      total: number of pairs, for the progress bar.
      show_progress: draw a progress bar.
      description: the progress bar's label.

    Returns:
      ``miou.ThresholdSweep.result()``.

    Raises:
      ValueError: an unreadable CAM file, or maps whose size differs from their ground truth (both named).
    """
    sweep = miou.ThresholdSweep(num_classes, thresholds)
    for cam_path, ground_truth, ground_truth_source in tqdm(
        pairs, total=total, desc=description, disable=not show_progress
    ):
        cams, keys = cam_files.read_score_maps(cam_path)
        if cams.shape[1:] != ground_truth.shape:
            raise ValueError(
                f"{cam_path}: CAM size {cams.shape[1:]} differs from its ground truth {ground_truth_source} "
                f"{ground_truth.shape}."
            )
        sweep.update(cams, keys, ground_truth)
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
    """``sweep_cam_files`` for every image of a split (ground truth: its ``mask``), CAM files from ``cam_dir``.

    Raises:
      FileNotFoundError: some images have no CAM file (the count and the first are named, with ``produced_by``,
        the stage that writes them), checked before any file is read.
    """
    paths = [cam_files.path_of(cam_dir, image_id) for image_id in source.ids()]
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(source)} CAM files are missing (first: {missing[0]}); run {produced_by} first."
        )
    pairs = (
        (cam_files.path_of(cam_dir, record["id"]), record["mask"], f"(the mask of image {record['id']!r})")
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
