"""Tests of the affinity and pseudo label rules against a direct numpy transcription of the authors' scripts
(make_affinity_labels.py, make_pseudo_labels.py) with pydensecrf called directly, and on hand-made maps whose labels
are known."""

import numpy as np
import pydensecrf.densecrf as densecrf
import pytest
from pydensecrf.utils import unary_from_labels

from puzzle_jax import cam_files
from puzzle_jax.refine import cam_labels


def _crf_inference_label(image, labels, n_labels, t):
    height, width = labels.shape
    model = densecrf.DenseCRF2D(width, height, n_labels)
    model.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=0.7, zero_unsure=False))
    model.addPairwiseGaussian(sxy=3, compat=3)
    model.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(image)), compat=10)
    return np.argmax(np.array(model.inference(t)).reshape((n_labels, height, width)), axis=0)


def _reference_label(maps, keys, image, threshold, t):
    padded = np.pad(maps.astype(np.float64), ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=threshold)
    return np.asarray(keys)[_crf_inference_label(image, np.argmax(padded, axis=0), len(keys), t)]


def _reference_affinity(hr_cam, keys, image, fg_threshold, bg_threshold, t):
    fg_conf = _reference_label(hr_cam, keys, image, fg_threshold, t)
    bg_conf = _reference_label(hr_cam, keys, image, bg_threshold, t)
    conf = fg_conf.copy()
    conf[fg_conf == 0] = 255
    conf[bg_conf + fg_conf == 0] = 0
    return conf


def _smooth_example(seed, keys, height=40, width=56):
    """Blob-shaped CAMs (max-normalised) and an image whose colours follow the blobs."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:height, :width]
    maps = []
    for _ in keys[1:]:
        centre = rng.uniform((0, 0), (height, width))
        spread = rng.uniform(6, 14)
        blob = np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * spread**2))
        maps.append(blob / blob.max())
    maps = np.asarray(maps, np.float32).reshape(len(keys) - 1, height, width)
    owner = np.argmax(np.concatenate([np.full((1, height, width), 0.3), maps]), axis=0)
    palette = rng.integers(0, 256, (len(keys), 3))
    image = np.clip(palette[owner] + rng.integers(-12, 13, (height, width, 3)), 0, 255).astype(np.uint8)
    return maps, np.asarray(keys), image


@pytest.mark.parametrize("keys, seed", [([0, 3], 0), ([0, 3, 8], 1), ([0, 1, 5, 20], 2)])
@pytest.mark.parametrize("iterations", [0, 10])
def test_affinity_labels_match_the_transcription(keys, seed, iterations):
    hr_cam, keys, image = _smooth_example(seed, keys)
    result = cam_labels.affinity_labels(
        hr_cam, keys, image, fg_threshold=0.40, bg_threshold=0.10, iterations=iterations
    )
    expected = _reference_affinity(hr_cam, keys, image, 0.40, 0.10, iterations)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, expected)
    # Every kind of pixel occurs: confident objects, uncertain (before the CRF smooths thin rings away), background.
    assert {0, int(keys[1])} | ({255} if iterations == 0 else set()) <= set(np.unique(result).tolist())


@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_pseudo_labels_match_the_transcription(iterations):
    rw, keys, image = _smooth_example(3, [0, 2, 15])
    result = cam_labels.pseudo_labels(rw, keys, image, threshold=0.35, iterations=iterations)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, _reference_label(rw, keys, image, 0.35, iterations))


def _hand_made():
    """Six columns of known scores for classes 2 and 7 (keys [0, 3, 8]: class c is stored as c + 1)."""
    columns = [
        (0.90, 0.10),  # class 2 beats fg 0.40           -> 3
        (0.20, 0.00),  # below fg, above bg 0.10         -> uncertain
        (0.05, 0.05),  # below both                      -> 0
        (0.50, 0.60),  # class 7 wins                    -> 8
        (0.40, 0.00),  # a tie with fg goes to background, above bg -> uncertain
        (0.10, 0.00),  # a tie with bg goes to background -> 0
    ]
    hr_cam = np.zeros((2, 3, len(columns)), np.float32)
    for column, (first, second) in enumerate(columns):
        hr_cam[:, :, column] = np.array([first, second], np.float32)[:, None]
    return hr_cam, np.array([0, 3, 8]), np.zeros((3, len(columns), 3), np.uint8)


def test_hand_made_affinity_labels_without_crf():
    hr_cam, keys, image = _hand_made()
    result = cam_labels.affinity_labels(hr_cam, keys, image, fg_threshold=0.4, bg_threshold=0.1, iterations=0)
    np.testing.assert_array_equal(result, np.tile([3, 255, 0, 8, 255, 0], (3, 1)))


def test_hand_made_pseudo_labels_without_crf():
    rw, keys, image = _hand_made()
    result = cam_labels.pseudo_labels(rw, keys, image, threshold=0.35, iterations=0)
    np.testing.assert_array_equal(result, np.tile([3, 0, 0, 8, 3, 0], (3, 1)))


def test_an_image_without_foreground_is_all_background():
    image = np.zeros((5, 7, 3), np.uint8)
    empty = np.zeros((0, 5, 7), np.float32)
    keys = np.array([0])
    affinity = cam_labels.affinity_labels(empty, keys, image, fg_threshold=0.4, bg_threshold=0.1, iterations=10)
    pseudo = cam_labels.pseudo_labels(empty, keys, image, threshold=0.35, iterations=1)
    for result in (affinity, pseudo):
        assert result.dtype == np.uint8 and result.shape == (5, 7) and not result.any()


def test_from_file_reads_the_named_field_and_names_size_mismatches(tmp_path):
    hr_cam, keys, image = _smooth_example(4, [0, 5, 9])
    path = str(tmp_path / "2007_000032.npz")
    cam_files.write_cam_file(path, keys=keys, hr_cam=hr_cam, rw=hr_cam[:, ::-1])
    np.testing.assert_array_equal(
        cam_labels.affinity_labels_from_file((path, image), fg_threshold=0.4, bg_threshold=0.1, iterations=2),
        _reference_affinity(hr_cam, keys, image, 0.4, 0.1, 2),
    )
    np.testing.assert_array_equal(
        cam_labels.pseudo_labels_from_file((path, image), threshold=0.35, iterations=1),
        _reference_label(hr_cam[:, ::-1], keys, image, 0.35, 1),
    )
    with pytest.raises(
        ValueError,
        match=r"2007_000032\.npz: the maps' size \(40, 56\) differs from the image's "
        r"size \(40, 50\)",
    ):
        cam_labels.affinity_labels_from_file((path, image[:, :50]), fg_threshold=0.4, bg_threshold=0.1, iterations=1)
    only_cam = str(tmp_path / "only_cam.npz")
    cam_files.write_cam_file(only_cam, keys=keys, hr_cam=hr_cam)
    with pytest.raises(ValueError, match=r"only_cam\.npz.*'rw'"):
        cam_labels.pseudo_labels_from_file((only_cam, image), threshold=0.35, iterations=1)
