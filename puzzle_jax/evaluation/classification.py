"""Scores of image-level predictions: average precision per class, mAP, and the loss of the label prior.

``label_prior_loss`` is what a classifier that ignores its images can reach: the multi-label soft-margin loss of
predicting each class's frequency (the binary entropy of each class's frequency, averaged over classes). A trained
classifier's loss well below it shows it learned from the images; a loss at that level, that it did not.
"""

from __future__ import annotations

import numpy as np


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of one class: the mean, over the positive images, of the precision among the images scored
    at least as high (non-interpolated; ties broken by the given order). NaN when there is no positive image."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0
    if not labels.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = labels[order]
    precision_at_hits = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    return float(precision_at_hits.mean())


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """mAP in percent over the classes with a positive image, and the per-class APs (percent, NaN for absent).

    Args:
      scores: ``(N, C)`` any monotone scores (logits or probabilities).
      labels: ``(N, C)`` multi-hot labels.
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be (images, classes).")
    per_class = [100.0 * average_precision(scores[:, c], labels[:, c]) for c in range(labels.shape[1])]
    present = [value for value in per_class if not np.isnan(value)]
    return (float(np.mean(present)) if present else float("nan")), per_class


def label_prior_loss(labels: np.ndarray) -> float:
    """The multi-label soft-margin loss of predicting every class's frequency in ``labels`` ``(N, C)``: the mean over
    classes of the binary entropy (in nats) of the frequency."""
    frequency = np.clip(np.asarray(labels, np.float64).mean(axis=0), 1e-12, 1 - 1e-12)
    return float(np.mean(-(frequency * np.log(frequency) + (1 - frequency) * np.log(1 - frequency))))


def multilabel_soft_margin_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """``torch.nn.MultiLabelSoftMarginLoss`` (mean over classes and images) on the host, in float64."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    log_sigmoid = -np.logaddexp(0.0, -logits)
    log_one_minus = -np.logaddexp(0.0, logits)
    return float(-np.mean(labels * log_sigmoid + (1 - labels) * log_one_minus))
