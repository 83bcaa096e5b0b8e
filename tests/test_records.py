"""Tests for the record schema (puzzle_jax/data/records.py): what builders store and what stages read back."""

import cv2
import numpy as np
import pytest
from PIL import Image

from puzzle_jax.data import records
from puzzle_jax.labels import BadExampleError


def test_features_declare_image_mask_id_and_labels():
    features = records.record_features(7)
    assert sorted(features.keys()) == ["id", "image", "labels", "mask"]
    assert features["image"].shape == (None, None, 3) and features["mask"].shape == (None, None, 1)
    assert features["labels"].shape == (7,) and features["labels"].np_dtype == np.float32


def test_encoded_record_holds_png_mask_and_float_labels():
    mask = np.array([[0, 1], [255, 2]], np.uint8)
    example = records.encode_record("x", image=b"jpeg bytes", mask=mask, labels=[1, 0, 1])
    assert example["image"] == b"jpeg bytes" and example["id"] == "x"
    assert example["labels"].dtype == np.float32 and example["labels"].tolist() == [1.0, 0.0, 1.0]
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(example["mask"], np.uint8), cv2.IMREAD_UNCHANGED), mask)


def test_decoded_record_has_the_stages_layout():
    stored = {
        "image": np.zeros((2, 3, 3), np.uint8),
        "mask": np.full((2, 3, 1), 255, np.uint8),  # tfds decodes single-channel PNGs as (H, W, 1).
        "id": b"2007_000032",
        "labels": np.array([0, 1], np.float64),
    }
    decoded = records.decode_record(stored)
    assert decoded["id"] == "2007_000032" and decoded["mask"].shape == (2, 3)
    assert decoded["image"].dtype == np.uint8 and decoded["labels"].dtype == np.float32
    assert "mask" not in records.decode_record(stored, decode_mask=False)


def test_part_maps_are_declared_per_dataset_and_stored_as_png():
    assert "parts" not in records.record_features(3)
    features = records.record_features(3, parts=True)
    assert sorted(features.keys()) == ["id", "image", "labels", "mask", "parts"]
    assert features["parts"].shape == (None, None, 1)
    mask = np.array([[0, 1, 1], [255, 2, 2]], np.uint8)
    parts = np.array([[0, 1, 2], [255, 1, 2]], np.uint8)
    example = records.encode_record("x", image=b"png", mask=mask, labels=[1, 1, 0], parts=parts)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(example["parts"], np.uint8), cv2.IMREAD_UNCHANGED), parts)
    assert "parts" not in records.encode_record("x", image=b"png", mask=mask, labels=[1, 1, 0])
    with pytest.raises(ValueError, match=r"part map values \[3\] are not in \[0, 1, 2, 255\]"):
        records.encode_record("x", image=b"png", mask=mask, labels=[1, 1, 0], parts=np.where(parts == 1, 3, parts))
    with pytest.raises(ValueError, match=r"'x': part map of shape \(2, 2\)"):
        records.encode_record("x", image=b"png", mask=mask, labels=[1, 1, 0], parts=parts[:, :2])


def test_decoded_part_maps_come_with_the_masks_only():
    stored = {
        "image": np.zeros((2, 3, 3), np.uint8),
        "mask": np.ones((2, 3, 1), np.uint8),
        "parts": np.full((2, 3, 1), 2, np.uint8),
        "id": b"a",
        "labels": np.array([1.0], np.float32),
    }
    decoded = records.decode_record(stored)
    assert decoded["parts"].shape == (2, 3) and decoded["parts"].dtype == np.uint8 and np.all(decoded["parts"] == 2)
    assert set(records.decode_record(stored, decode_mask=False)) == {"image", "id", "labels"}
    assert "parts" not in records.decode_record({key: value for key, value in stored.items() if key != "parts"})


def test_part_map_pngs_grey_or_palette_are_read_and_bad_ones_name_the_file(tmp_path):
    parts = np.array([[0, 1, 2], [255, 1, 0]], np.uint8)
    Image.fromarray(parts, mode="L").save(tmp_path / "grey.png")
    # A palette PNG's values are its indices, whatever the colours (here not VOC's).
    palette_image = Image.new("P", (3, 2))
    palette_image.putdata(parts.ravel().tolist())
    palette_image.putpalette([value for index in range(256) for value in (index, 255 - index, 0)])
    palette_image.save(tmp_path / "palette.png")
    for name in ("grey.png", "palette.png"):
        read = records.read_parts_png(str(tmp_path / name))
        assert read.dtype == np.uint8
        np.testing.assert_array_equal(read, parts)
    Image.fromarray(np.array([[0, 1, 7]], np.uint8), mode="L").save(tmp_path / "seven.png")
    with pytest.raises(BadExampleError, match=r"seven\.png: part map has value\(s\) \[7\]; allowed: 0"):
        records.read_parts_png(str(tmp_path / "seven.png"))
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(BadExampleError, match=r"colour\.png: part map has image mode 'RGB'"):
        records.read_parts_png(str(tmp_path / "colour.png"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(BadExampleError, match=r"broken\.png: part map is corrupt"):
        records.read_parts_png(str(tmp_path / "broken.png"))
    with pytest.raises(BadExampleError, match=r"missing\.png: part map file is missing"):
        records.read_parts_png(str(tmp_path / "missing.png"))


def test_scoring_knows_the_same_part_values():
    from puzzle_jax.evaluation import miou

    assert miou.PART_NAMES == records.PART_NAMES == {records.PART_BODY: "body", records.PART_DISCRIMINATIVE: "part"}
