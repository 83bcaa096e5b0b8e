"""Tests for the record schema (puzzle_jax/data/records.py): what builders store and what stages read back."""

import cv2
import numpy as np

from puzzle_jax.data import records


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
