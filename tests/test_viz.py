"""Tests for the label-map colouring and the CAM / label overlays (the galleries: tests/test_gallery.py)."""

import numpy as np
import pytest

from puzzle_jax.viz import overlays, palette


def test_colorize_labels():
    labels = np.array([[0, 1], [15, 255]], np.uint8)
    rgb = palette.colorize_labels(labels)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 1], (128, 0, 0))
    np.testing.assert_array_equal(rgb[1, 0], (192, 128, 128))
    np.testing.assert_array_equal(rgb[1, 1], (224, 224, 192))
    with pytest.raises(ValueError):
        palette.colorize_labels(np.array([[256]], np.int64))
    with pytest.raises(ValueError):
        palette.colorize_labels(np.zeros((2, 2), np.float32))


def test_cam_overlay_hot_region_is_redder():
    image = np.full((6, 8, 3), 128, np.uint8)
    cam = np.zeros((6, 8), np.float32)
    cam[:, :4] = 1.0
    out = overlays.cam_overlay(image, cam)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    redness = out[..., 0].astype(int) - out[..., 2].astype(int)
    assert redness[:, :4].min() > 0 > redness[:, 4:].max()
    # A strided CAM is resized to the image.
    small = overlays.cam_overlay(image, cam[::2, ::2])
    assert small.shape == (6, 8, 3) and small.dtype == np.uint8
    assert small[0, 0, 0] > small[0, 0, 2] and small[0, 7, 0] < small[0, 7, 2]


def test_label_overlay_keeps_background():
    image = np.full((4, 4, 3), 100, np.uint8)
    labels = np.zeros((4, 4), np.uint8)
    labels[0, 0] = 1
    out = overlays.label_overlay(image, labels)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[1:], image[1:])
    np.testing.assert_array_equal(out[0, 0], (114, 50, 50))  # 50/50 of (100,100,100) and (128,0,0)
