"""Tests of the hard-label dense CRF against pydensecrf called directly as IRN's crf_inference_label does."""

import numpy as np
import pydensecrf.densecrf as densecrf
import pytest
from pydensecrf.utils import unary_from_labels

from puzzle_jax.refine import crf


def _reference(image, labels, n_labels, iterations, gt_prob=0.7):
    """IRN's crf_inference_label, written out call by call (spec §7)."""
    height, width = labels.shape
    model = densecrf.DenseCRF2D(width, height, n_labels)
    model.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False))
    model.addPairwiseGaussian(sxy=3, compat=3)
    model.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(image)), compat=10)
    marginals = model.inference(iterations)
    return np.argmax(np.array(marginals).reshape((n_labels, height, width)), axis=0)


def _blocky_example(seed, height=48, width=64, n_labels=3):
    """An image of coloured blocks and labels that mostly follow them, with noise the CRF should clean."""
    rng = np.random.default_rng(seed)
    regions = np.zeros((height, width), np.int64)
    regions[:, width // 3 :] = 1
    regions[height // 2 :, 2 * width // 3 :] = 2
    colours = rng.integers(0, 256, (n_labels, 3))
    image = np.clip(colours[regions] + rng.integers(-10, 11, (height, width, 3)), 0, 255).astype(np.uint8)
    labels = np.where(rng.random((height, width)) < 0.15, rng.integers(0, n_labels, (height, width)), regions)
    return image, labels, regions


@pytest.mark.parametrize("iterations", [1, 10])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_direct_pydensecrf_sequence(seed, iterations):
    image, labels, regions = _blocky_example(seed)
    refined = crf.refine_labels(image, labels, 3, iterations=iterations)
    assert refined.shape == labels.shape
    np.testing.assert_array_equal(refined, _reference(image, labels, 3, iterations))
    # The CRF does its job: the label noise is mostly gone.
    assert (refined == regions).mean() > (labels == regions).mean()


def test_other_gt_prob_matches_the_reference():
    image, labels, _ = _blocky_example(2, n_labels=4)
    np.testing.assert_array_equal(
        crf.refine_labels(image, labels, 4, iterations=3, gt_prob=0.9), _reference(image, labels, 4, 3, gt_prob=0.9)
    )


def test_zero_iterations_give_back_the_labels():
    image, labels, _ = _blocky_example(3, n_labels=5)
    np.testing.assert_array_equal(crf.refine_labels(image, labels, 5, iterations=0), labels)


def test_a_uniform_image_with_one_label_keeps_it():
    image = np.full((20, 30, 3), 120, np.uint8)
    labels = np.full((20, 30), 2)
    np.testing.assert_array_equal(crf.refine_labels(image, labels, 4, iterations=10), labels)


def test_a_lone_pixel_in_a_uniform_region_is_absorbed():
    image = np.full((21, 21, 3), 80, np.uint8)
    labels = np.zeros((21, 21), np.int64)
    labels[10, 10] = 1
    assert not crf.refine_labels(image, labels, 2, iterations=10).any()


@pytest.mark.parametrize(
    "image, labels, n_labels, match",
    [
        (np.zeros((4, 5, 3), np.float32), np.zeros((4, 5), int), 2, "uint8"),
        (np.zeros((4, 5), np.uint8), np.zeros((4, 5), int), 2, "uint8"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((5, 4), int), 2, "do not match"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5), int), 1, "at least 2"),
        (np.zeros((4, 5, 3), np.uint8), np.full((4, 5), 2), 2, r"\[0, 2\)"),
    ],
)
def test_bad_inputs_are_named(image, labels, n_labels, match):
    with pytest.raises(ValueError, match=match):
        crf.refine_labels(image, labels, n_labels, iterations=1)


def _segmenter_reference(image, probabilities, iterations):
    """The authors' DeepLab CRF written out call by call (spec §9): -log p unary, Gaussian 3/3, bilateral
    80/13/10. (unary_from_softmax is -log(clip(p, 1e-8)), written out here.)"""
    height, width, classes = probabilities.shape
    model = densecrf.DenseCRF2D(width, height, classes)
    unary = -np.log(np.clip(probabilities.transpose(2, 0, 1), 1e-8, None)).reshape(classes, -1)
    model.setUnaryEnergy(np.ascontiguousarray(unary.astype(np.float32)))
    model.addPairwiseGaussian(sxy=3, compat=3)
    model.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(np.copy(image)), compat=10)
    marginals = model.inference(iterations)
    return np.argmax(np.array(marginals).reshape((classes, height, width)), axis=0)


def _noisy_probabilities(labels, n_labels, seed):
    """Softmax probabilities that favour ``labels`` with noise."""
    rng = np.random.default_rng(seed)
    logits = 2.0 * np.eye(n_labels)[labels] + rng.normal(0, 1.2, (*labels.shape, n_labels))
    exponentials = np.exp(logits - logits.max(-1, keepdims=True))
    return (exponentials / exponentials.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("iterations", [1, 10])
def test_segmenter_crf_matches_the_direct_pydensecrf_sequence(iterations):
    image, _, regions = _blocky_example(4, n_labels=3)
    probabilities = _noisy_probabilities(regions, 3, seed=5)
    refined = crf.refine_probabilities(image, probabilities, iterations=iterations)
    np.testing.assert_array_equal(refined, _segmenter_reference(image, probabilities, iterations))
    assert (refined == regions).mean() > (probabilities.argmax(-1) == regions).mean()


def test_segmenter_crf_without_iterations_is_the_argmax():
    image, _, regions = _blocky_example(6, n_labels=4)
    probabilities = _noisy_probabilities(regions, 4, seed=7)
    refined = crf.refine_probabilities(image, probabilities, iterations=0)
    np.testing.assert_array_equal(refined, probabilities.argmax(-1))


def test_segmenter_crf_rejects_bad_probabilities():
    image, _, regions = _blocky_example(8, n_labels=3)
    probabilities = _noisy_probabilities(regions, 3, seed=9)
    with pytest.raises(ValueError, match="image's size"):
        crf.refine_probabilities(image, probabilities[:-1], iterations=1)
    probabilities[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        crf.refine_probabilities(image, probabilities, iterations=1)
