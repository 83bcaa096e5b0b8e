"""Segmentation scores: confusion matrices, IoU / mIoU, FP / FN rates and the CAM threshold sweep.

Owns the mIoU convention of the project (wsss-conventions §5a, the VOC devkit rule):

* One confusion matrix is accumulated over the **whole split** (not averaged per image), in int64.
* Ground-truth pixels equal to ``ignore_index`` (255, void/boundary) leave the matrix entirely.
* Predictions outside ``[0, num_classes)`` (e.g. 255 "uncertain" pixels of pseudo labels) are
  counted in an extra last column, so a matrix has shape ``(C, C + 1)``: rows are GT classes,
  columns predicted classes plus "invalid prediction". By default (``invalid_predictions="wrong"``,
  as in the devkit and the IRN/AMN scorers) such a pixel is a false negative of its GT class and
  nobody's false positive; ``invalid_predictions="ignore"`` drops it (ToCo's ``pseudo_scores``).
  Both can be read from one matrix.
* ``IoU_c = TP / (TP + FP + FN)``. A class absent from both GT and prediction has IoU **NaN** and is
  left out of the mean (``nanmean``, as chainercv/ToCo). The authors add 1e-10 to the denominator,
  so such a class scores 0 and drags their mean down; on VOC train/val every class is present and
  both agree.
* mIoU is in percent, over all classes including background.
* FP / FN rates (spec §6): ``(P - TP) / union`` and ``(T - TP) / union`` averaged over the
  foreground classes (1..C-1), as fractions.
* Part recall (``ThresholdSweep`` with part maps, ``data.records``): of the GT object pixels (GT class
  1..C-1, not ignored) that the part map marks as body (1) or as discriminative part (2), the
  fraction predicted as their GT class, accumulated over the split like the matrices. It tells
  whether CAMs cover whole objects or only their most discriminative part.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from puzzle_jax.labels import IGNORE_LABEL

# Part map values (`data.records.PART_BODY`, `PART_DISCRIMINATIVE`) scored by `ThresholdSweep`, and their names in
# its results; 0 (not an object or unknown) and IGNORE_LABEL are not scored. Repeated here, not imported, so that
# scoring does not import the data package (tfds).
PART_NAMES = {1: "body", 2: "part"}

INVALID_PREDICTION_POLICIES = ("wrong", "ignore")
# The authors' evaluate.py sweep 0.05, 0.10, ..., 0.75, rounded so 0.15 is 0.15 and not
# 0.15000000000000002.
DEFAULT_THRESHOLDS = tuple(float(value) for value in np.round(np.arange(1, 16) * 0.05, 2))


def _check_num_classes(num_classes: int) -> None:
    is_integer = isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, bool)
    if not is_integer or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")


def _valid_ground_truth(ground_truth: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """Returns the mask of scored pixels; raises on GT values neither a class nor ignored."""
    ground_truth = np.asarray(ground_truth)
    valid = ground_truth != ignore_index
    scored = ground_truth[valid]
    if scored.size and (scored.min() < 0 or scored.max() >= num_classes):
        bad = np.unique(scored[(scored < 0) | (scored >= num_classes)])
        raise ValueError(
            f"Ground truth holds values {bad[:10].tolist()} outside [0, {num_classes}) that are "
            f"not ignore_index={ignore_index}."
        )
    return valid


def confusion_matrix(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    num_classes: int,
    ignore_index: int = IGNORE_LABEL,
) -> np.ndarray:
    """Counts (GT class, predicted class) pairs over the pixels of one or more images.

    Args:
      prediction: integer label map(s), any shape equal to ``ground_truth``'s.
      ground_truth: integer label map(s) with values in ``[0, num_classes)`` or ``ignore_index``.
      num_classes: number of classes C, background included (21 for VOC).
      ignore_index: GT value whose pixels are not scored.

    Returns:
      ``(C, C + 1)`` int64 matrix; entry ``[g, p]`` counts pixels of GT class ``g`` predicted as
      ``p``, and the last column counts pixels whose prediction lies outside ``[0, C)``.

    Raises:
      ValueError: on a shape mismatch or a GT value that is neither a class nor ``ignore_index``.
    """
    _check_num_classes(num_classes)
    prediction = np.asarray(prediction)
    ground_truth = np.asarray(ground_truth)
    if prediction.shape != ground_truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from ground_truth shape {ground_truth.shape}.")
    valid = _valid_ground_truth(ground_truth, num_classes, ignore_index)
    true_class = ground_truth[valid].astype(np.int64)
    predicted = prediction[valid].astype(np.int64)
    # Any out-of-range prediction goes to the extra column C.
    predicted = np.where((predicted >= 0) & (predicted < num_classes), predicted, num_classes)
    columns = num_classes + 1
    counts = np.bincount(true_class * columns + predicted, minlength=num_classes * columns)
    return counts.astype(np.int64).reshape(num_classes, columns)


def _class_counts(confusion: np.ndarray, invalid_predictions: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (true positives, GT pixels, predicted pixels) per class from a confusion matrix."""
    if invalid_predictions not in INVALID_PREDICTION_POLICIES:
        raise ValueError(
            f"Unknown invalid_predictions policy {invalid_predictions!r}; allowed values are "
            f"{', '.join(INVALID_PREDICTION_POLICIES)}."
        )
    confusion = np.asarray(confusion, dtype=np.int64)
    if confusion.ndim < 2:
        raise ValueError(f"A confusion matrix needs 2 dimensions, got shape {confusion.shape}.")
    num_classes = confusion.shape[-2]
    if confusion.shape[-1] not in (num_classes, num_classes + 1):
        raise ValueError(f"Confusion matrix shape {confusion.shape} is neither (..., C, C) nor (..., C, C + 1).")
    class_columns = confusion[..., :num_classes]
    true_positive = np.diagonal(class_columns, axis1=-2, axis2=-1)
    counted = confusion if invalid_predictions == "wrong" else class_columns
    ground_truth_count = counted.sum(axis=-1)
    predicted_count = class_columns.sum(axis=-2)
    return true_positive, ground_truth_count, predicted_count


def iou_from_confusion(confusion: np.ndarray, *, invalid_predictions: str = "wrong") -> np.ndarray:
    """Per-class IoU ``TP / (TP + FP + FN)`` as fractions.

    Args:
      confusion: ``(..., C, C + 1)`` (or ``(..., C, C)``) matrix from ``confusion_matrix``;
        leading axes (e.g. one matrix per threshold) are kept.
      invalid_predictions: ``"wrong"`` (out-of-range predictions are FN of the GT class) or
        ``"ignore"``.

    Returns:
      ``(..., C)`` float64 IoU; NaN for a class absent from both GT and prediction.
    """
    counts = _class_counts(confusion, invalid_predictions)
    true_positive, ground_truth_count, predicted_count = counts
    union = ground_truth_count + predicted_count - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, true_positive / np.maximum(union, 1), np.nan)


def _nanmean_last_axis(values: np.ndarray) -> np.ndarray:
    """``nanmean`` over the last axis; NaN (without a warning) where all entries are NaN."""
    present = ~np.isnan(values)
    count = present.sum(axis=-1)
    total = np.where(present, values, 0.0).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def mean_iou(confusion: np.ndarray, *, invalid_predictions: str = "wrong") -> float | np.ndarray:
    """Mean IoU in percent over all classes (background included), NaN classes left out.

    Args:
      confusion: ``(..., C, C + 1)`` or ``(..., C, C)`` confusion matrix.
      invalid_predictions: see ``iou_from_confusion``.

    Returns:
      A float for one matrix, an array for stacked matrices; NaN if no class occurs at all.
    """
    result = 100.0 * _nanmean_last_axis(iou_from_confusion(confusion, invalid_predictions=invalid_predictions))
    return float(result) if np.ndim(result) == 0 else result


def false_positive_negative_rates(confusion: np.ndarray, *, invalid_predictions: str = "wrong") -> tuple[Any, Any]:
    """The authors' FP and FN figures (spec §6), averaged over foreground classes.

    ``FP_c = (P_c - TP_c) / union_c`` and ``FN_c = (T_c - TP_c) / union_c`` for classes ``1..C-1``
    (class 0 is background), averaged ignoring classes with an empty union.

    Args:
      confusion: ``(..., C, C + 1)`` or ``(..., C, C)`` confusion matrix.
      invalid_predictions: see ``iou_from_confusion``.

    Returns:
      ``(false_positive, false_negative)`` as fractions: floats for one matrix, arrays for stacked
      ones.
    """
    counts = _class_counts(confusion, invalid_predictions)
    true_positive, ground_truth_count, predicted_count = counts
    union = ground_truth_count + predicted_count - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        safe_union = np.maximum(union, 1)
        false_positive = np.where(union > 0, (predicted_count - true_positive) / safe_union, np.nan)
        false_negative = np.where(union > 0, (ground_truth_count - true_positive) / safe_union, np.nan)
    false_positive = _nanmean_last_axis(false_positive[..., 1:])
    false_negative = _nanmean_last_axis(false_negative[..., 1:])
    if np.ndim(false_positive) == 0:
        return float(false_positive), float(false_negative)
    return false_positive, false_negative


def _foreground_keys(cams: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Class ids of the foreground maps; accepts ids with or without the authors' leading 0."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    num_maps = cams.shape[0]
    if keys.shape[0] == num_maps + 1 and keys[0] == 0:
        keys = keys[1:]  # the authors' npy layout: [0, c1 + 1, c2 + 1, ...]
    if keys.shape[0] != num_maps:
        raise ValueError(
            f"keys {keys.tolist()} do not match {num_maps} CAM channels: pass one class id "
            "(1-based, background 0 excluded) per channel, optionally preceded by the background "
            "id 0."
        )
    if num_maps and keys.min() < 1:
        raise ValueError(f"Foreground keys must be class ids >= 1 (0 is background), got {keys.tolist()}.")
    return keys


def _check_cams(cams: np.ndarray) -> np.ndarray:
    cams = np.asarray(cams)
    if cams.ndim != 3:
        raise ValueError(f"cams must have shape (K, H, W), got {cams.shape}.")
    return cams


def cams_to_labels(cams: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """Turns an image's foreground CAMs into a label map (spec §6, ``evaluate.py`` npy mode).

    A background channel filled with ``threshold`` goes in front, the argmax is taken over channels
    (ties go to the earlier channel, so background wins a tie with the threshold), and channel ``i``
    maps to ``[0] + keys``.

    Args:
      cams: ``(K, H, W)`` max-normalised CAMs of the image's GT classes (``K`` may be 0).
      keys: the class ids of those maps, ``(K,)`` 1-based with background 0 excluded; the authors'
        ``(K + 1,)`` layout with a leading 0 is accepted too.
      threshold: background score.

    Returns:
      ``(H, W)`` int64 label map.
    """
    cams = _check_cams(cams)
    foreground_keys = _foreground_keys(cams, keys)
    background = np.full((1,) + cams.shape[1:], threshold, dtype=cams.dtype)
    scores = np.concatenate([background, cams], axis=0)
    channel_keys = np.concatenate([np.zeros(1, np.int64), foreground_keys])
    return channel_keys[np.argmax(scores, axis=0)]


class ThresholdSweep:
    """Accumulates one confusion matrix per background threshold over a split of CAMs.

    Per pixel only two things matter: the best foreground class ``k`` (the first maximal CAM) with
    its score ``v``, and for threshold ``t`` the label is ``k`` if ``v > t`` else background. So
    each image is reduced to a count per (number of thresholds below ``v``, GT class, ``k``) with
    one ``bincount``, and a cumulative sum over that count gives all thresholds' matrices at once
    (no per-threshold pass). This equals ``cams_to_labels`` followed by ``confusion_matrix`` for
    every threshold.

    With a part map, the count gains a part axis (0: not scored, 1: body, 2: discriminative part):
    the diagonal of its object classes counts, per part and number of thresholds won, the pixels
    predicted as their GT class, and the same cumulative sum gives every threshold's part recall.
    """

    def __init__(
        self,
        num_classes: int,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        ignore_index: int = IGNORE_LABEL,
    ):
        """Creates an empty sweep.

        Args:
          num_classes: C, background included.
          thresholds: background scores to try (sorted internally).
          ignore_index: GT value that is not scored.
        """
        _check_num_classes(num_classes)
        thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        if thresholds.size == 0:
            raise ValueError("ThresholdSweep needs at least one threshold.")
        self.num_classes = int(num_classes)
        self.thresholds = np.sort(thresholds)
        self.ignore_index = ignore_index
        # (T, C, C + 1): the last column stays 0 (CAM labels are always valid classes).
        self.confusion = np.zeros((self.thresholds.size, num_classes, num_classes + 1), dtype=np.int64)
        self.num_images = 0
        # Per part value of PART_NAMES (in that order): scored GT object pixels, and per threshold those predicted
        # as their GT class.
        self.part_pixels = np.zeros((len(PART_NAMES),), dtype=np.int64)
        self.part_hits = np.zeros((self.thresholds.size, len(PART_NAMES)), dtype=np.int64)
        self.num_images_given_parts = 0
        self.num_images_with_parts = 0

    def update(
        self, cams: np.ndarray, keys: np.ndarray, ground_truth: np.ndarray, parts: np.ndarray | None = None
    ) -> None:
        """Adds one image.

        Args:
          cams: ``(K, H, W)`` foreground CAMs of the image's GT classes.
          keys: class ids of those maps (see ``cams_to_labels``).
          ground_truth: ``(H, W)`` GT label map with ``ignore_index`` for void.
          parts: optional ``(H, W)`` part map (``data.records``: 0 not scored, 1 body, 2 discriminative part, 255
            ignored); only its pixels on GT object classes count.

        Raises:
          ValueError: shapes that differ, GT values that are no class, or part values outside 0, 1, 2, 255.
        """
        cams = _check_cams(cams)
        foreground_keys = _foreground_keys(cams, keys)
        ground_truth = np.asarray(ground_truth)
        if ground_truth.shape != cams.shape[1:]:
            raise ValueError(f"ground_truth shape {ground_truth.shape} differs from the CAM size {cams.shape[1:]}.")
        if foreground_keys.size and foreground_keys.max() >= self.num_classes:
            raise ValueError(f"keys {foreground_keys.tolist()} hold a class id >= num_classes={self.num_classes}.")
        valid = _valid_ground_truth(ground_truth, self.num_classes, self.ignore_index)
        true_class = ground_truth[valid].astype(np.int64)
        part = None if parts is None else self._scored_parts(parts, ground_truth.shape, valid, true_class)
        num_thresholds = self.thresholds.size
        columns = self.num_classes + 1
        if cams.shape[0] == 0:
            # No foreground map: every pixel is background at every threshold (no part pixel is recalled).
            background_counts = np.bincount(true_class, minlength=self.num_classes)
            self.confusion[:, :, 0] += background_counts[None, :]
            if part is not None:
                self.part_pixels += np.bincount(part, minlength=len(PART_NAMES) + 1)[1:]
            self.num_images += 1
            return
        scored_cams = cams[:, valid]
        best_score = scored_cams.max(axis=0)
        best_class = foreground_keys[np.argmax(scored_cams, axis=0)]
        # Compare in the CAMs' dtype, exactly as the float background channel of cams_to_labels
        # does.
        thresholds = self.thresholds.astype(cams.dtype)
        # Number of thresholds strictly below the score = the thresholds at which the foreground
        # wins.
        wins = np.searchsorted(thresholds, best_score, side="left")
        # Without parts the part axis has one entry (everything in "not scored").
        num_parts = 1 if part is None else len(PART_NAMES) + 1
        outer = wins if part is None else wins * num_parts + part
        counts = np.bincount(
            (outer * self.num_classes + true_class) * columns + best_class,
            minlength=(num_thresholds + 1) * num_parts * self.num_classes * columns,
        ).reshape(num_thresholds + 1, num_parts, self.num_classes, columns)
        if part is not None:
            objects = np.arange(1, self.num_classes)
            # Object pixels predicted as their GT class when the foreground wins, per (wins, part).
            correct = counts[:, 1:, objects, objects].sum(axis=-1)
            self.part_hits += np.cumsum(correct[::-1], axis=0)[::-1][1:]
            self.part_pixels += counts[:, 1:, 1:, :].sum(axis=(0, 2, 3))
        counts = counts.sum(axis=1)
        # Foreground wins at threshold i for pixels with wins > i: reverse cumulative sum over wins.
        foreground = np.cumsum(counts[::-1], axis=0)[::-1][1:]
        per_class_total = counts.sum(axis=(0, 2))  # scored GT pixels per class
        background = per_class_total[None, :] - foreground.sum(axis=2)
        update = foreground.astype(np.int64)
        update[:, :, 0] += background
        self.confusion += update
        self.num_images += 1

    def _scored_parts(
        self, parts: np.ndarray, shape: tuple[int, ...], valid: np.ndarray, true_class: np.ndarray
    ) -> np.ndarray:
        """The part index (0 not scored, 1 body, 2 discriminative part) of every scored GT pixel; counts the image."""
        parts = np.asarray(parts)
        if parts.shape != shape:
            raise ValueError(f"parts shape {parts.shape} differs from the ground truth's {shape}.")
        values = np.unique(parts)
        bad = values[~np.isin(values, (0, *PART_NAMES, IGNORE_LABEL))]
        if bad.size:
            raise ValueError(f"parts hold values {bad[:10].tolist()}; allowed: 0, 1, 2 and {IGNORE_LABEL}.")
        part = parts[valid].astype(np.int64)
        # Only GT object pixels count; 255 (ignored) and 0 become "not scored".
        part = np.where((true_class >= 1) & np.isin(part, tuple(PART_NAMES)), part, 0)
        self.num_images_given_parts += 1
        self.num_images_with_parts += int(np.any(part))
        return part

    def result(self) -> dict[str, Any]:
        """Scores every threshold and picks the best one.

        Returns:
          A dict with ``best_threshold`` (float), ``miou`` (percent, at the best threshold),
          ``per_class_iou`` (list of percent per class at the best threshold, NaN for absent
          classes), ``thresholds``, ``per_threshold_miou`` (percent),
          ``per_threshold_false_positive`` and ``per_threshold_false_negative`` (fractions, spec
          §6, for the authors' ``rw`` heuristics), and ``num_images``. When part maps were given for
          at least one image, also ``part_recall`` (``{"body": fraction, "part": fraction}`` at the
          best threshold, NaN for a part without pixels), ``per_threshold_part_recall`` (``{"body":
          [...], "part": [...]}``), ``part_pixels`` (the scored object pixels of each part) and
          ``num_images_with_parts`` (images whose part map marks at least one scored object pixel).

        Raises:
          RuntimeError: if no image was added.
        """
        if self.num_images == 0:
            raise RuntimeError("ThresholdSweep.result() called before any update().")
        per_threshold_miou = mean_iou(self.confusion)
        false_positive, false_negative = false_positive_negative_rates(self.confusion)
        scores = np.where(np.isnan(per_threshold_miou), -np.inf, per_threshold_miou)
        best = int(np.argmax(scores))  # ties: the lowest threshold
        result = {
            "best_threshold": float(self.thresholds[best]),
            "miou": float(per_threshold_miou[best]),
            "per_class_iou": (100.0 * iou_from_confusion(self.confusion[best])).tolist(),
            "thresholds": self.thresholds.tolist(),
            "per_threshold_miou": per_threshold_miou.tolist(),
            "per_threshold_false_positive": np.asarray(false_positive).tolist(),
            "per_threshold_false_negative": np.asarray(false_negative).tolist(),
            "num_images": self.num_images,
        }
        if self.num_images_given_parts:
            with np.errstate(divide="ignore", invalid="ignore"):
                recall = np.where(
                    self.part_pixels > 0, self.part_hits / np.maximum(self.part_pixels, 1), np.nan
                )
            names = list(PART_NAMES.values())
            result["part_recall"] = {name: float(recall[best, index]) for index, name in enumerate(names)}
            result["per_threshold_part_recall"] = {name: recall[:, index].tolist() for index, name in enumerate(names)}
            result["part_pixels"] = {name: int(self.part_pixels[index]) for index, name in enumerate(names)}
            result["num_images_with_parts"] = self.num_images_with_parts
        return result


def threshold_range(start: float, stop: float, step: float) -> np.ndarray:
    """Thresholds from ``start`` to ``stop`` inclusive by ``step``, rounded so that 0.05 steps do not drift.

    Raises:
      ValueError: unless start <= stop and step > 0.
    """
    start, stop, step = float(start), float(stop), float(step)
    if step <= 0 or stop < start:
        raise ValueError(f"threshold range ({start}, {stop}, {step}): need start <= stop and step > 0.")
    count = int(round((stop - start) / step)) + 1
    return np.round(start + step * np.arange(count), 6)
