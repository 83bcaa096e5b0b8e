"""The record schema every dataset shares: what a builder stores, and what a stage reads back.

This module owns the one declaration of a record, used by every builder (`demo`, `voc`, `voc_folder`, `coco`) and
by `datasets.load_split`. A record is one image with its labels. Stored (`record_features`, `encode_record`):

    image   the image's encoded bytes, JPEG or PNG (tfds decodes them to uint8 (H, W, 3) RGB)
    mask    single-channel PNG of the label map
    id      str
    labels  float32 (C,) multi-hot image-level labels

Read back (`decode_record`), the layout every stage uses:

    image   uint8 (H, W, 3) RGB
    mask    uint8 (H, W): 0 background, 1..C classes, 255 ignored (`labels.IGNORE_LABEL`); absent when the split is
            opened with `decode_masks=False`, as classifier training does: it needs image-level labels only, and
            skipping the PNG decode saves the loader ~1 ms of ~10 per 500x375 image
    id      str
    labels  float32 (C,) multi-hot image-level labels
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import tensorflow_datasets as tfds


def record_features(num_classes: int) -> tfds.features.FeaturesDict:
    """The tfds features of a record with ``num_classes`` foreground classes (every builder's `_info`).

    Images and masks are handed to tfds as encoded bytes, which it stores as they are: encoding arrays would need
    TensorFlow.
    """
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
            "id": tfds.features.Text(),
            "labels": tfds.features.Tensor(shape=(num_classes,), dtype=np.float32),
        }
    )


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) or BGR (H, W, 3) array."""
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode an array of shape {array.shape} as PNG.")
    return encoded.tobytes()


def encode_record(example_id: str, *, image: bytes, mask: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The tfds example of one record.

    Args:
      example_id: the record's id.
      image: the image's encoded JPEG or PNG bytes.
      mask: uint8 (H, W) label map, the image's size.
      labels: (C,) multi-hot image-level labels.

    Returns:
      The example, in the layout of `record_features`.
    """
    return {
        "image": image,
        "mask": encode_png(mask),
        "id": example_id,
        "labels": np.asarray(labels, np.float32),
    }


def decode_id(example_id: Any) -> str:
    """A stored record's id as a str (tfds hands `Text` features back as UTF-8 bytes)."""
    return str(example_id.decode("utf-8") if isinstance(example_id, bytes) else example_id)


def decode_record(record: Mapping[str, Any], *, decode_mask: bool = True) -> dict[str, Any]:
    """Converts one tfds numpy record to the layout every stage uses (see the module docstring).

    With ``decode_mask=False`` the record (read with the mask's decoding skipped) has no ``mask``.
    """
    decoded = {
        "image": np.asarray(record["image"], np.uint8),
        "id": decode_id(record["id"]),
        "labels": np.asarray(record["labels"], np.float32),
    }
    if decode_mask:
        mask = np.asarray(record["mask"], np.uint8)
        if mask.ndim == 3:
            # Masks are stored as single-channel PNGs, which tfds decodes as (H, W, 1).
            mask = mask[..., 0]
        decoded["mask"] = mask
    return decoded
