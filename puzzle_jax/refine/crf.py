"""The dense CRFs of the pipeline, on the host CPU through pydensecrf.

* ``refine_labels``: IRN's ``crf_inference_label`` (spec §7; wsss-conventions §5b, "hard-label refinement"), which
  Puzzle-CAM's affinity labels (10 iterations) and pseudo labels (1 iteration) use: a unary from the hard labels
  (``gt_prob`` 0.7 on the given label, the rest spread evenly, no "unsure" label), a Gaussian pairwise term (sxy 3,
  compat 3) and a bilateral one on the RGB image (sxy 50, srgb 5, compat 10), mean-field inference, argmax.
* ``refine_probabilities``: the segmenter's CRF (spec §9): a unary of ``-log p`` from softmax probabilities, a
  Gaussian term (sxy 3, compat 3) and a bilateral one (sxy 80, srgb 13, compat 10), mean-field inference, argmax;
  ``probability_labels`` is it as a per-image function (``infer_seg``, ``predict``).

This module imports no JAX: it runs in the worker processes of ``per_image.compute_in_processes`` and in Ray's
workers (``ray_backend``), which should start quickly and never initialise an accelerator.
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as densecrf
from pydensecrf import utils as densecrf_utils

# Pairwise kernels of the hard-label CRF (IRN's crf_inference_label; the authors use it unchanged).
GAUSSIAN_SXY = 3
GAUSSIAN_COMPAT = 3
BILATERAL_SXY = 50
BILATERAL_SRGB = 5
BILATERAL_COMPAT = 10
# Pairwise kernels of the segmenter's CRF (the authors' DeepLab inference; the Gaussian term is the same).
SEGMENTER_BILATERAL_SXY = 80
SEGMENTER_BILATERAL_SRGB = 13
SEGMENTER_BILATERAL_COMPAT = 10


def refine_labels(
    image: np.ndarray, labels: np.ndarray, n_labels: int, *, iterations: int, gt_prob: float = 0.7
) -> np.ndarray:
    """Refines a hard label map with the dense CRF.

    Args:
      image: uint8 ``(H, W, 3)`` RGB image.
      labels: integer ``(H, W)`` label map with values in ``[0, n_labels)`` (indices, not class ids).
      n_labels: number of labels, at least 2.
      iterations: mean-field steps (0 gives back ``labels``: the unary alone favours each pixel's own label).
      gt_prob: the probability the unary gives each pixel's own label.

    Returns:
      int64 ``(H, W)`` refined label map in ``[0, n_labels)``.

    Raises:
      ValueError: shapes that differ, a non-uint8 or non-RGB image, fewer than 2 labels, labels out of range,
        negative iterations.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    _check_image(image)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels of shape {labels.shape} do not match the image's size {image.shape[:2]}.")
    if n_labels < 2:
        raise ValueError(f"the label CRF needs at least 2 labels; got n_labels={n_labels}.")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"labels must lie in [0, {n_labels}); got [{labels.min()}, {labels.max()}].")
    _check_iterations(iterations)
    height, width = labels.shape
    crf = densecrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(
        densecrf_utils.unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False)
    )
    crf.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_COMPAT)
    crf.addPairwiseBilateral(
        sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB, rgbim=np.ascontiguousarray(image), compat=BILATERAL_COMPAT
    )
    marginals = np.asarray(crf.inference(iterations)).reshape(n_labels, height, width)
    return np.argmax(marginals, axis=0)


def refine_probabilities(image: np.ndarray, probabilities: np.ndarray, *, iterations: int) -> np.ndarray:
    """The segmenter's dense CRF on softmax probabilities (spec §9, step 3).

    Args:
      image: uint8 ``(H, W, 3)`` RGB image.
      probabilities: ``(H, W, C)`` class probabilities (each pixel's sum 1), C >= 2.
      iterations: mean-field steps (0 gives back the argmax of ``probabilities``).

    Returns:
      int64 ``(H, W)`` label map in ``[0, C)``.

    Raises:
      ValueError: shapes that differ, a non-uint8 or non-RGB image, fewer than 2 classes, values that are not
        probabilities (negative, NaN), negative iterations.
    """
    image = np.asarray(image)
    probabilities = np.asarray(probabilities, np.float32)
    _check_image(image)
    if probabilities.ndim != 3 or probabilities.shape[:2] != image.shape[:2] or probabilities.shape[2] < 2:
        raise ValueError(
            f"probabilities must be (H, W, C) with C >= 2 and the image's size {image.shape[:2]}; got "
            f"{probabilities.shape}."
        )
    if not np.all(np.isfinite(probabilities)) or probabilities.min() < 0:
        raise ValueError("probabilities must be finite and non-negative.")
    _check_iterations(iterations)
    height, width, num_classes = probabilities.shape
    crf = densecrf.DenseCRF2D(width, height, num_classes)
    # unary_from_softmax takes (C, H, W) and clips at 1e-8 before the logarithm.
    crf.setUnaryEnergy(densecrf_utils.unary_from_softmax(np.ascontiguousarray(probabilities.transpose(2, 0, 1))))
    crf.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_COMPAT)
    crf.addPairwiseBilateral(
        sxy=SEGMENTER_BILATERAL_SXY,
        srgb=SEGMENTER_BILATERAL_SRGB,
        rgbim=np.ascontiguousarray(image),
        compat=SEGMENTER_BILATERAL_COMPAT,
    )
    marginals = np.asarray(crf.inference(iterations)).reshape(num_classes, height, width)
    return np.argmax(marginals, axis=0)


def probability_labels(job: tuple[np.ndarray, np.ndarray, int]) -> np.ndarray:
    """``(image, probabilities, iterations) -> uint8 (H, W) labels``: ``refine_probabilities`` as the per-image
    function of ``infer_seg`` and ``predict`` (``seg_inference.label_maps``), run in a worker process or Ray task."""
    image, probabilities, iterations = job
    return refine_probabilities(image, probabilities, iterations=iterations).astype(np.uint8)


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3) RGB; got {image.dtype} {image.shape}.")


def _check_iterations(iterations: int) -> None:
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0; got {iterations}.")
