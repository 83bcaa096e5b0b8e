"""Tests of the image-level scores: average precision against a brute-force definition, mAP, the label prior's
loss against the best constant predictor, and the soft-margin loss against PyTorch's."""

import itertools

import numpy as np
import pytest
import torch

from puzzle_jax.evaluation import classification


def _brute_force_average_precision(scores, labels):
    """Precision at each positive, counting every image scored at least as high (distinct scores)."""
    positives = [i for i in range(len(labels)) if labels[i]]
    precisions = []
    for i in positives:
        at_least = [j for j in range(len(scores)) if scores[j] >= scores[i]]
        precisions.append(sum(labels[j] for j in at_least) / len(at_least))
    return float(np.mean(precisions))


def test_average_precision_equals_its_definition():
    rng = np.random.default_rng(0)
    for _ in range(50):
        count = int(rng.integers(2, 30))
        scores = rng.permutation(count).astype(np.float64) + rng.random()  # distinct scores
        labels = rng.random(count) < 0.4
        if not labels.any():
            labels[0] = True
        assert classification.average_precision(scores, labels) == pytest.approx(
            _brute_force_average_precision(scores, labels)
        )
    # Closed forms: perfect ranking 1; positives ranked 2nd and 4th: (1/2 + 2/4) / 2.
    assert classification.average_precision([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert classification.average_precision([4, 3, 2, 1], [0, 1, 0, 1]) == pytest.approx(0.5)
    assert np.isnan(classification.average_precision([0.3, 0.2], [0, 0]))


def test_mean_average_precision_skips_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4], [0.1, 0.3, 0.6]])
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    mean_ap, per_class = classification.mean_average_precision(scores, labels)
    assert per_class[:2] == [100.0, 100.0] and np.isnan(per_class[2])
    assert mean_ap == 100.0
    with pytest.raises(ValueError, match="must both be"):
        classification.mean_average_precision(scores, labels[:2])


def test_the_label_prior_loss_is_the_best_constant_predictors_loss():
    rng = np.random.default_rng(1)
    labels = (rng.random((40, 5)) < np.array([0.1, 0.3, 0.5, 0.7, 0.05])).astype(np.float32)
    prior = classification.label_prior_loss(labels)
    frequency = labels.mean(axis=0)
    best_logits = np.log(frequency / (1 - frequency))
    assert classification.multilabel_soft_margin_loss(np.tile(best_logits, (40, 1)), labels) == pytest.approx(prior)
    # Any other constant does worse.
    for offsets in itertools.product((-0.3, 0.3), repeat=2):
        other = best_logits.copy()
        other[:2] += offsets
        assert classification.multilabel_soft_margin_loss(np.tile(other, (40, 1)), labels) > prior


def test_soft_margin_loss_equals_torchs():
    rng = np.random.default_rng(2)
    logits, labels = rng.normal(size=(6, 4)) * 3, (rng.random((6, 4)) < 0.5).astype(np.float64)
    expected = torch.nn.MultiLabelSoftMarginLoss()(torch.from_numpy(logits), torch.from_numpy(labels))
    assert classification.multilabel_soft_margin_loss(logits, labels) == pytest.approx(float(expected), rel=1e-12)
