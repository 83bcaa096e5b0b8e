"""Tests for the label-map owner (puzzle_jax/labels.py): the VOC palette, reading and writing label PNGs.

References are independent of the code under test: the VOC devkit's colour rule written out separately, masks
written by PIL in every PNG mode, and label maps drawn at random.
"""

import os

import numpy as np
import pytest
from PIL import Image
from test_voc import write_palette_mask

from puzzle_jax import labels
from puzzle_jax.labels import BadExampleError

# --------------------------------------------------------------------------------------------------
# The palette.
# --------------------------------------------------------------------------------------------------


def _reference_voc_colour(label: int) -> tuple[int, int, int]:
    """The VOC devkit's colour map rule (bitget over the label's bits, 3 at a time), written independently."""
    red = green = blue = 0
    for shift in range(8):
        red += ((label >> (3 * shift)) & 1) * 2 ** (7 - shift)
        green += ((label >> (3 * shift + 1)) & 1) * 2 ** (7 - shift)
        blue += ((label >> (3 * shift + 2)) & 1) * 2 ** (7 - shift)
    return red, green, blue


def test_palette_matches_voc_definition():
    colours = labels.voc_palette()
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    # Well-known VOC colours: aeroplane, bicycle, person, tvmonitor, void.
    assert tuple(colours[0]) == (0, 0, 0)
    assert tuple(colours[1]) == (128, 0, 0)
    assert tuple(colours[2]) == (0, 128, 0)
    assert tuple(colours[15]) == (192, 128, 128)
    assert tuple(colours[20]) == (0, 64, 128)
    assert tuple(colours[255]) == (224, 224, 192)
    for label in range(255):
        assert tuple(int(value) for value in colours[label]) == _reference_voc_colour(label), label


def test_palette_copy_does_not_change_cache():
    colours = labels.voc_palette()
    colours[1] = (1, 2, 3)
    assert tuple(labels.voc_palette()[1]) == (128, 0, 0)


def test_ignore_label_is_the_void_value():
    assert labels.IGNORE_LABEL == 255


# --------------------------------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------------------------------


def test_palette_grey_and_colour_masks_decode_to_class_ids(tmp_path):
    mask = np.array([[0, 1, 12], [15, 255, 20]], np.uint8)
    write_palette_mask(str(tmp_path / "p.png"), mask, seed=5)
    np.testing.assert_array_equal(labels.read_label_png(tmp_path / "p.png", 20), mask)
    Image.fromarray(mask, mode="L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(labels.read_label_png(tmp_path / "l.png", 20), mask)
    # VOC colour map: 0 black, 1 aeroplane (128,0,0), 12 dog (64,0,128), 15 person (192,128,128),
    # 20 tvmonitor (0,64,128), 255 void (224,224,192).
    colours = {0: (0, 0, 0), 1: (128, 0, 0), 12: (64, 0, 128), 15: (192, 128, 128),
               20: (0, 64, 128), 255: (224, 224, 192)}
    rgb = np.array([[colours[value] for value in row] for row in mask.tolist()], np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(labels.read_label_png(tmp_path / "rgb.png", 20), mask)


def test_bad_masks_are_clear_errors_naming_the_file(tmp_path):
    Image.fromarray(np.array([[0, 21]], np.uint8), mode="L").save(tmp_path / "value.png")
    with pytest.raises(BadExampleError, match=r"value\.png.*\[21\].*allowed: 0"):
        labels.read_label_png(tmp_path / "value.png", 20)
    Image.fromarray(np.full((2, 2, 3), 7, np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(BadExampleError, match=r"colour\.png.*\(7, 7, 7\)"):
        labels.read_label_png(tmp_path / "colour.png", 20)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(BadExampleError, match=r"broken\.png.*corrupt"):
        labels.read_label_png(tmp_path / "broken.png", 20)
    with pytest.raises(BadExampleError, match=r"absent\.png: mask file is missing"):
        labels.read_label_png(tmp_path / "absent.png", 20)


def test_string_paths_read_as_local_files(tmp_path):
    mask = np.array([[0, 3], [255, 1]], np.uint8)
    Image.fromarray(mask, mode="L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(labels.read_label_png(str(tmp_path / "l.png"), 3), mask)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadExampleError, match=r"empty\.png: mask file is empty") as caught:
        labels.read_label_png(str(tmp_path / "empty.png"), 3)
    assert caught.value.path == str(tmp_path / "empty.png") and caught.value.problem == "mask file is empty"


# --------------------------------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_written_label_maps_read_back_exactly(tmp_path, dtype):
    rng = np.random.default_rng(0)
    for trial in range(5):
        height, width = (int(side) for side in rng.integers(1, 40, size=2))
        label_map = rng.integers(0, 21, (height, width))
        label_map[rng.uniform(size=(height, width)) < 0.2] = 255
        path = tmp_path / f"map_{trial}.png"
        labels.write_label_png(path, label_map.astype(dtype))
        np.testing.assert_array_equal(labels.read_label_png(path, 20), label_map)
    # Every value a uint8 label map can hold.
    every_value = np.arange(256).reshape(16, 16)
    labels.write_label_png(tmp_path / "all.png", every_value)
    np.testing.assert_array_equal(labels.read_label_png(tmp_path / "all.png", 254), every_value)


def test_written_file_is_a_palette_png_in_the_voc_colours(tmp_path):
    label_map = np.array([[0, 1, 15], [20, 255, 2]], np.uint8)
    path = tmp_path / "sub" / "map.png"  # The folder is created.
    labels.write_label_png(str(path), label_map)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "P" and image.size == (3, 2)
        palette = np.asarray(image.getpalette(), np.uint8).reshape(-1, 3)
        np.testing.assert_array_equal(palette, labels.voc_palette())
        # What a viewer shows: the VOC colours, 255 in the void colour.
        shown = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(shown[1, 1], (224, 224, 192))
    np.testing.assert_array_equal(shown[0, 1], (128, 0, 0))
    np.testing.assert_array_equal(shown, labels.voc_palette()[label_map])
    assert os.listdir(path.parent) == ["map.png"]  # No temporary file left.


def test_bad_label_maps_are_clear_errors_and_write_nothing(tmp_path):
    path = tmp_path / "map.png"
    with pytest.raises(ValueError, match=r"shape \(H, W\), got \(2, 2, 3\)"):
        labels.write_label_png(path, np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="integer labels, got dtype float32"):
        labels.write_label_png(path, np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"\[0, 255\], got \[0, 256\]"):
        labels.write_label_png(path, np.array([[0, 256]]))
    with pytest.raises(ValueError, match=r"\[0, 255\], got \[-1, 3\]"):
        labels.write_label_png(path, np.array([[-1, 3]]))
    with pytest.raises(ValueError, match=r"map\.npz: a label PNG path must end in '\.png'"):
        labels.write_label_png(tmp_path / "map.npz", np.zeros((2, 2), np.uint8))
    assert os.listdir(tmp_path) == []


def test_a_failing_write_leaves_no_file_and_keeps_an_old_one(tmp_path, monkeypatch):
    path = tmp_path / "map.png"
    labels.write_label_png(path, np.ones((3, 3), np.uint8))
    before = path.read_bytes()

    def save_half_then_fail(self, target, *args, **kwargs):
        with open(target, "wb") as file:
            file.write(b"\x89PNG\r\n\x1a\n")  # A truncated file, as a killed write leaves.
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        labels.write_label_png(path, np.zeros((3, 3), np.uint8))
    with pytest.raises(OSError, match="disk full"):
        labels.write_label_png(tmp_path / "new.png", np.zeros((3, 3), np.uint8))
    assert sorted(os.listdir(tmp_path)) == ["map.png"] and path.read_bytes() == before
