"""Tests for the label-map colouring, the CAM / label overlays and the HTML gallery."""

import os
import re

import numpy as np
import pytest

from puzzle_jax.viz import gallery, overlays, palette


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


def _entry(image_id, foreground_columns, **extra):
    """A 4x4 image whose GT is class 1 in the left two columns; the CAM is hot on `foreground_columns`."""
    ground_truth = np.zeros((4, 4), np.uint8)
    ground_truth[:, :2] = 1
    cams = np.zeros((1, 4, 4), np.float32)
    cams[0, :, :foreground_columns] = 1.0
    rng = np.random.default_rng(0)
    entry = {
        "id": image_id,
        "image": rng.integers(0, 256, (4, 4, 3), dtype=np.uint8),
        "ground_truth": ground_truth,
        "cams": cams,
        "keys": np.array([0, 1]),
        "threshold": 0.5,
    }
    entry.update(extra)
    return entry


def _img_sources(page):
    return re.findall(r'<img src="([^"]+)"', page)


def test_gallery_orders_worst_first_and_links_exist(tmp_path):
    # IoUs: perfect 100%; 3 predicted columns: (8/12 + 4/8) / 2 = 58.3%; empty: (8/16 + 0) / 2 = 25%.
    entries = [_entry("a_perfect", 2), _entry("m_wide", 3), _entry("z_empty", 0)]
    index = gallery.write_gallery(str(tmp_path), entries, class_names=["cat", "dog"], title="Test gallery")
    assert index == os.path.join(str(tmp_path), "index.html")
    page = open(index, encoding="utf-8").read()
    assert "Test gallery" in page
    assert page.index("z_empty") < page.index("m_wide") < page.index("a_perfect")
    for expected in ("25.0%", "58.3%", "100.0%", "cat"):
        assert expected in page
    sources = _img_sources(page)
    # Per image: image, GT, prediction and one CAM overlay.
    assert len(sources) == 3 * 4
    for source in sources:
        assert not os.path.isabs(source) and ".." not in source
        assert os.path.isfile(os.path.join(str(tmp_path), source)), source
    assert "compare" not in page
    assert not [name for name in os.listdir(tmp_path / "images") if name.startswith(".")]


def test_gallery_compare_columns(tmp_path):
    compare_cams = np.zeros((1, 4, 4), np.float32)  # the plain run misses the object: 25%
    entries = [
        _entry("img_a", 2, compare_cams=compare_cams, compare_keys=np.array([0, 1])),
        _entry("img_b", 0, compare_cams=compare_cams, compare_keys=np.array([0, 1])),
    ]
    index = gallery.write_gallery(
        str(tmp_path), entries, class_names=["cat", "dog"], title="Puzzle vs plain", compare_name="plain"
    )
    page = open(index, encoding="utf-8").read()
    assert page.index("img_b") < page.index("img_a")
    assert "plain IoU 25.0%" in page and "(+75.0)" in page
    sources = _img_sources(page)
    assert len(sources) == 2 * 6
    assert sum("compare_" in source for source in sources) == 2 * 2
    for source in sources:
        assert os.path.isfile(os.path.join(str(tmp_path), source)), source
    assert os.path.isfile(tmp_path / "images" / "img_a_compare_cam1.png")


def test_gallery_rejects_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match="same file name"):
        gallery.write_gallery(str(tmp_path), [_entry("x", 2), _entry("x", 2)], class_names=["cat"], title="t")
