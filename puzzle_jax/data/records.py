"""The record schema every dataset shares: what a builder stores, and what a stage reads back.

This module owns the one declaration of a record, used by every builder (`demo`, `voc`, `voc_folder`, `coco`) and
by `datasets.load_split`. A record is one image with its labels. Stored (`record_features`, `encode_record`):

    image   the image's encoded bytes, JPEG or PNG (tfds decodes them to uint8 (H, W, 3) RGB)
    mask    single-channel PNG of the label map
    id      str
    labels  float32 (C,) multi-hot image-level labels
    parts   optional, declared per dataset (`record_features(..., parts=True)`): single-channel PNG of the part map

Read back (`decode_record`), the layout every stage uses:

    image   uint8 (H, W, 3) RGB
    mask    uint8 (H, W): 0 background, 1..C classes, 255 ignored (`labels.IGNORE_LABEL`); absent when the split is
            opened with `decode_masks=False`, as classifier training does: it needs image-level labels only, and
            skipping the PNG decode saves the loader ~1 ms of ~10 per 500x375 image
    id      str
    labels  float32 (C,) multi-hot image-level labels
    parts   uint8 (H, W), only in datasets that declare it and only with the masks: which part of an object each pixel
            is, for scoring how much of the objects' body and of their discriminative part the CAMs recover
            (`evaluation.miou.ThresholdSweep`): `PART_NONE` 0 not an object or unknown, `PART_BODY` 1 an object's
            body (weak class evidence), `PART_DISCRIMINATIVE` 2 an object's discriminative part (strong evidence:
            a head), 255 ignored (`labels.IGNORE_LABEL`, e.g. the void band along object boundaries). Only pixels
            whose mask is an object class count. The demo declares it (it knows each object's head and body), a
            `voc_folder` with `SegmentationParts/` too; VOC 2012 and COCO do not.

Part maps stored as PNG files (a `voc_folder`'s `SegmentationParts/<id>.png`, the evaluator's `--parts`) are read
with `read_parts_png`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from puzzle_jax.labels import IGNORE_LABEL, BadExampleError, read_file_bytes

# The values of a part map (`parts`), besides IGNORE_LABEL.
PART_NONE = 0
PART_BODY = 1
PART_DISCRIMINATIVE = 2
PART_VALUES = (PART_NONE, PART_BODY, PART_DISCRIMINATIVE, IGNORE_LABEL)
# The name of each scored part value in results and summaries (`ThresholdSweep.result()`'s `part_recall`).
PART_NAMES = {PART_BODY: "body", PART_DISCRIMINATIVE: "part"}


def record_features(num_classes: int, *, parts: bool = False) -> tfds.features.FeaturesDict:
    """The tfds features of a record with ``num_classes`` foreground classes (every builder's `_info`).

    Images and masks are handed to tfds as encoded bytes, which it stores as they are: encoding arrays would need
    TensorFlow.

    Args:
      num_classes: C, the foreground classes.
      parts: whether records carry a part map (`parts`); a dataset declares it for all its records or for none.
    """
    features = {
        "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
        "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
        "id": tfds.features.Text(),
        "labels": tfds.features.Tensor(shape=(num_classes,), dtype=np.float32),
    }
    if parts:
        features["parts"] = tfds.features.Image(shape=(None, None, 1), dtype=np.uint8)
    return tfds.features.FeaturesDict(features)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) or BGR (H, W, 3) array."""
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode an array of shape {array.shape} as PNG.")
    return encoded.tobytes()


def encode_record(
    example_id: str, *, image: bytes, mask: np.ndarray, labels: np.ndarray, parts: np.ndarray | None = None
) -> dict[str, Any]:
    """The tfds example of one record.

    Args:
      example_id: the record's id.
      image: the image's encoded JPEG or PNG bytes.
      mask: uint8 (H, W) label map, the image's size.
      labels: (C,) multi-hot image-level labels.
      parts: uint8 (H, W) part map (values `PART_VALUES`), for a dataset that declares parts; None for one that
        does not.

    Returns:
      The example, in the layout of `record_features` (with ``parts`` when given).

    Raises:
      ValueError: a part map whose size differs from the mask's or that holds a value outside `PART_VALUES`.
    """
    example = {
        "image": image,
        "mask": encode_png(mask),
        "id": example_id,
        "labels": np.asarray(labels, np.float32),
    }
    if parts is not None:
        parts = np.asarray(parts)
        if parts.shape != np.shape(mask):
            raise ValueError(f"Record {example_id!r}: part map of shape {parts.shape} for a mask of {np.shape(mask)}.")
        bad = part_values_not_allowed(parts)
        if bad:
            raise ValueError(f"Record {example_id!r}: part map values {bad} are not in {list(PART_VALUES)}.")
        example["parts"] = encode_png(parts.astype(np.uint8))
    return example


def part_values_not_allowed(parts: np.ndarray) -> list[int]:
    """The values of a part map that are not in `PART_VALUES` (at most 10, sorted); empty when it is valid."""
    values = np.unique(np.asarray(parts))
    return values[~np.isin(values, PART_VALUES)][:10].tolist()


def read_parts_png(path: Any) -> np.ndarray:
    """Reads a part map PNG: a grey or palette PNG whose pixel values (palette indices) are `PART_VALUES`.

    Args:
      path: the PNG: a string (local file) or a path object with `read_bytes` (pathlib, etils epath).

    Returns:
      uint8 (H, W).

    Raises:
      BadExampleError: naming the file, for a missing or corrupt file, a colour PNG, or a value not in `PART_VALUES`.
    """
    data = read_file_bytes(path, "part map")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            if mode not in ("P", "L"):
                raise BadExampleError(
                    path, f"part map has image mode {mode!r}; save it as a grey or palette PNG of values 0/1/2/255"
                )
            parts = np.asarray(image, np.uint8)
    except BadExampleError:
        raise
    except Exception as error:  # PIL raises many types for corrupt files.
        raise BadExampleError(path, f"part map is corrupt or not an image ({error})") from error
    bad = part_values_not_allowed(parts)
    if bad:
        raise BadExampleError(
            path,
            f"part map has value(s) {bad}; allowed: {PART_NONE} (not an object or unknown), {PART_BODY} (body), "
            f"{PART_DISCRIMINATIVE} (discriminative part) and {IGNORE_LABEL} (ignored)",
        )
    return parts


def decode_id(example_id: Any) -> str:
    """A stored record's id as a str (tfds hands `Text` features back as UTF-8 bytes)."""
    return str(example_id.decode("utf-8") if isinstance(example_id, bytes) else example_id)


def _single_channel(array: Any) -> np.ndarray:
    array = np.asarray(array, np.uint8)
    # Masks and part maps are stored as single-channel PNGs, which tfds decodes as (H, W, 1).
    return array[..., 0] if array.ndim == 3 else array


def decode_record(record: Mapping[str, Any], *, decode_mask: bool = True) -> dict[str, Any]:
    """Converts one tfds numpy record to the layout every stage uses (see the module docstring).

    With ``decode_mask=False`` the record (read with the decoding of the mask and of any part map skipped) has no
    ``mask`` and no ``parts``; with it, ``parts`` is there when the dataset declares it.
    """
    decoded = {
        "image": np.asarray(record["image"], np.uint8),
        "id": decode_id(record["id"]),
        "labels": np.asarray(record["labels"], np.float32),
    }
    if decode_mask:
        decoded["mask"] = _single_channel(record["mask"])
        if "parts" in record:
            decoded["parts"] = _single_channel(record["parts"])
    return decoded
