"""Evaluation: confusion matrices, IoU / mIoU, FP / FN rates and the CAM threshold sweep (with part recall)."""

from puzzle_jax.evaluation.miou import (
    DEFAULT_THRESHOLDS,
    ThresholdSweep,
    cams_to_labels,
    confusion_matrix,
    false_positive_negative_rates,
    iou_from_confusion,
    mean_iou,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ThresholdSweep",
    "cams_to_labels",
    "confusion_matrix",
    "false_positive_negative_rates",
    "iou_from_confusion",
    "mean_iou",
]
