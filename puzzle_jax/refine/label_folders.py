"""A split's folder of label PNGs made from its score files: writing it in worker processes, and scoring it.

The ``aff_labels`` and ``pseudo_labels`` stages are the same loop over different files and rules: for each image of
the split whose ``<label_dir>/<id>.png`` does not exist yet, a worker (a process of a local pool or a Ray task:
``per_image.host_compute``, ``config.refine.backend``) reads ``<score_dir>/<id>.npz`` (``cam_files``) and applies a
``cam_labels`` rule with the CRF; the parent decodes the image (the split is decoded anyway; an image pickles as its
pixels, while the score file is read where it is used, so its float maps never cross a pipe) and writes each label
map atomically as it arrives (``labels.write_label_png``, VOC palette, 255 in the void colour).

Scoring reads the finished folder once at the end, so a resumed run is scored on all its images: one confusion
matrix over the split (``miou.confusion_matrix``: GT 255 ignored, predicted 255 in the extra column), the share of
predicted 255, and the images without a foreground class (from the score files' keys).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from puzzle_jax import cam_files, labels, per_image, progress
from puzzle_jax.evaluation import miou


def _ids(source: Sequence[dict[str, Any]]) -> list[str]:
    """The split's ids in record order, without decoding the records where the split can list them."""
    return list(source.ids()) if hasattr(source, "ids") else [record["id"] for record in source]


def label_path(label_dir: str, image_id: str) -> str:
    """The label PNG of ``image_id`` in ``label_dir``."""
    return os.path.join(label_dir, f"{image_id}.png")


def write_label_folder(
    source: Sequence[dict[str, Any]],
    *,
    score_dir: str,
    label_dir: str,
    function: Callable[[tuple[str, np.ndarray]], np.ndarray],
    backend: per_image.HostBackend,
    produced_by: str,
    description: str,
) -> dict[str, int]:
    """Writes the label PNG of every image of this process's share that has none.

    Args:
      source: the split's records (``id``, ``image``).
      score_dir: the folder of the score files (``<id>.npz``).
      label_dir: the output folder.
      function: ``(score file path, image) -> uint8 (H, W) label map``, picklable (``cam_labels.*_from_file``).
      backend: where ``function`` runs (``per_image.HostBackend.from_config(config.refine)``); the files are the
        same for each.
      produced_by: the stage that writes the score files, for the missing-file message.
      description: the progress bar's label.

    Returns:
      ``per_image.write_per_image``'s counts.

    Raises:
      FileNotFoundError: images without a label PNG have no score file; the count, the first image and its file are
        named, before any work starts.
    """
    ids = _ids(source)
    missing = [
        image_id
        for image_id in ids
        if not os.path.exists(label_path(label_dir, image_id))
        and not os.path.exists(cam_files.path_of(score_dir, image_id))
    ]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(ids)} images have no score file (first: image {missing[0]!r}, "
            f"{cam_files.path_of(score_dir, missing[0])}); run {produced_by} first."
        )
    return per_image.write_per_image(
        source,
        output_path=lambda image_id: label_path(label_dir, image_id),
        compute=per_image.host_compute(
            function,
            prepare=lambda record: (cam_files.path_of(score_dir, record["id"]), record["image"]),
            backend=backend,
        ),
        write=labels.write_label_png,
        description=description,
    )


def score_label_folder(
    source: Sequence[dict[str, Any]],
    *,
    label_dir: str,
    score_dir: str | None,
    num_classes: int,
    show_progress: bool = True,
    description: str = "score",
) -> dict[str, Any]:
    """Scores the label PNGs of a split against its masks, in one pass.

    Args:
      source: the split's records (``id``, ``mask``: 255 where there is no ground truth); ``ids()`` where it has it.
      label_dir: the label PNGs (one per image).
      score_dir: the score files they were made from (their keys tell which images have no foreground class); None
        for labels made otherwise (the count is then 0).
      num_classes: classes including background.
      show_progress: draw a progress bar.
      description: the progress bar's label.

    Returns:
      ``confusion`` (``(C, C + 1)`` int64, the last column predicted 255), ``void_pixels`` and ``pixels`` (all
      pixels of the label maps), ``images``, ``images_without_foreground``.

    Raises:
      ValueError: a label PNG whose size differs from its mask (both named), or with values that are not a class; a
        mask value that is not a class (the image named).
      FileNotFoundError: some images have no label PNG (the count and the first are named).
      labels.BadExampleError: an unreadable label PNG.
    """
    ids = _ids(source)
    missing = [image_id for image_id in ids if not os.path.exists(label_path(label_dir, image_id))]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(source)} images to score have no label map in {label_dir} (first: "
            f"{label_path(label_dir, missing[0])}): the scored images (config.eval.split) must be among the images "
            "the labels were made for (config.infer.split)."
        )
    confusion = np.zeros((num_classes, num_classes + 1), np.int64)
    void_pixels = pixels = without_foreground = 0
    for record in progress.track(source, description=description, enabled=show_progress):
        path = label_path(label_dir, record["id"])
        label_map = labels.read_label_png(path, num_classes - 1)
        mask = record["mask"]
        if label_map.shape != mask.shape:
            raise ValueError(f"{path}: size {label_map.shape} differs from image {record['id']!r}'s mask {mask.shape}.")
        try:
            confusion += miou.confusion_matrix(label_map, mask, num_classes)
        except ValueError as error:  # a mask value beyond the classes: name the image
            raise ValueError(f"{path} against the mask of image {record['id']!r}: {error}") from error
        void_pixels += int(np.count_nonzero(label_map == labels.IGNORE_LABEL))
        pixels += label_map.size
        score_path = cam_files.path_of(score_dir, record["id"]) if score_dir else None
        if score_path and os.path.exists(score_path) and len(cam_files.read_cam_file(score_path, ())["keys"]) == 1:
            without_foreground += 1
    return {
        "confusion": confusion,
        "void_pixels": void_pixels,
        "pixels": pixels,
        "images": len(source),
        "images_without_foreground": without_foreground,
    }


def precision_recall(confusion: np.ndarray) -> dict[str, Any]:
    """Precision and recall of labels with uncertain (255) pixels, from a ``(C, C + 1)`` confusion matrix.

    Precision: of the confident (not 255) pixels with ground truth, the fraction labelled correctly; recall: of the
    pixels with ground truth, the fraction labelled confidently and correctly. Per class too (None where undefined).
    Fractions; None overall when no pixel has ground truth.
    """
    confusion = np.asarray(confusion, np.int64)
    num_classes = confusion.shape[0]
    correct = np.diagonal(confusion[:, :num_classes])
    predicted = confusion[:, :num_classes].sum(axis=0)
    ground_truth = confusion.sum(axis=1)

    def ratio(numerator, denominator):
        return None if denominator == 0 else float(numerator / denominator)

    return {
        "precision": ratio(correct.sum(), predicted.sum()),
        "recall": ratio(correct.sum(), ground_truth.sum()),
        "per_class_precision": [ratio(c, p) for c, p in zip(correct, predicted)],
        "per_class_recall": [ratio(c, g) for c, g in zip(correct, ground_truth)],
    }
