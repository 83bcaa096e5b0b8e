"""Readers of example files (VOC layout), shared by the builders of downloaded data.

This module owns how one file becomes part of a record: split lists (one id per line), images (validated, stored as
their original JPEG/PNG bytes), VOC XML image-level labels (spec §1), SBD `cls/*.mat` masks, and the labels a mask
implies. Label PNGs are read by `puzzle_jax.labels.read_label_png`. Every reader raises `BadExampleError`
(`puzzle_jax.labels`), naming the file, for a file that is missing or invalid.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence

import cv2
import numpy as np
from etils import epath

from puzzle_jax.data import records
from puzzle_jax.labels import BadExampleError, check_mask_values, read_file_bytes


def read_id_list(path: epath.PathLike) -> list[str]:
    """Reads a split list: one id per line (first whitespace-separated field), CRLF tolerated.

    Args:
      path: the list file, e.g. `ImageSets/Segmentation/train.txt`.

    Returns:
      The ids in file order.

    Raises:
      FileNotFoundError: when the file does not exist.
      ValueError: when it lists no id or an id twice.
    """
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Split list {path} does not exist.")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"Split list {path} is empty: it lists no image id.")
    seen: set[str] = set()
    for example_id in ids:
        if example_id in seen:
            raise ValueError(f"Split list {path} lists id {example_id!r} more than once.")
        seen.add(example_id)
    return ids


def read_image(path: epath.PathLike) -> tuple[bytes, int, int]:
    """Reads and validates an image file; returns the bytes to store and the image size.

    The original bytes are stored when they are a JPEG or PNG that tfds's reader (OpenCV,
    `IMREAD_UNCHANGED`: EXIF orientation ignored, as PIL does) decodes to 8-bit grey or RGB.
    Anything else (alpha, 16 bits, other formats) is converted to 8-bit RGB and stored as PNG.

    Args:
      path: the image file.

    Returns:
      (encoded, height, width).

    Raises:
      BadExampleError: for a missing, empty, unreadable or corrupt (e.g. truncated) file.
    """
    path = epath.Path(path)
    data = read_file_bytes(path, "image")
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.size == 0:
        raise BadExampleError(path, "image is corrupt or not in a format OpenCV can decode")
    height, width = decoded.shape[:2]
    is_jpeg_or_png = data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"
    channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    if is_jpeg_or_png and decoded.dtype == np.uint8 and channels in (1, 3):
        return data, height, width
    if decoded.dtype == np.uint16:
        decoded = np.rint(decoded / 257.0).astype(np.uint8)
    elif decoded.dtype != np.uint8:
        raise BadExampleError(path, f"image has unsupported pixel type {decoded.dtype}")
    if channels == 1:
        decoded = decoded.reshape(height, width)
    elif channels == 4:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGRA2BGR)
    elif channels != 3:
        raise BadExampleError(path, f"image has {channels} channels; expected 1, 3 or 4")
    return records.encode_png(decoded), height, width


def read_sbd_mask(path: epath.PathLike, num_classes: int) -> np.ndarray:
    """Reads an SBD `cls/<id>.mat` file (MATLAB struct GTcls.Segmentation) as uint8 class ids.

    Args:
      path: the .mat file.
      num_classes: number of foreground classes C (20, VOC's).

    Returns:
      uint8 (H, W): 0 background, 1..C classes, 255 ignored.

    Raises:
      BadExampleError: for a missing or unreadable file, one without GTcls.Segmentation, or a value that is not a
        class.
    """
    import scipy.io  # pylint: disable=import-outside-toplevel  (only SBD needs it)

    path = epath.Path(path)
    data = read_file_bytes(path, "SBD mask")
    try:
        content = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
        segmentation = content["GTcls"].Segmentation
    except Exception as error:  # scipy raises many types for corrupt files.
        raise BadExampleError(
            path, f"is not an SBD cls .mat file with GTcls.Segmentation ({error})"
        ) from error
    mask = np.asarray(segmentation)
    if mask.ndim != 2:
        raise BadExampleError(path, f"GTcls.Segmentation has shape {mask.shape}; expected (H, W)")
    if mask.min() < 0 or mask.max() > 255:
        raise BadExampleError(path, "GTcls.Segmentation has values outside 0..255")
    return check_mask_values(mask.astype(np.uint8), path, num_classes)


def _box_coordinate(box: ElementTree.Element, field: str, path: epath.Path) -> float:
    text = box.findtext(field)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise BadExampleError(path, f"bndbox {field} is {text!r}, not a number") from None


def parse_xml_labels(path: epath.PathLike, class_names: Sequence[str]) -> np.ndarray:
    """Image-level labels from a VOC XML annotation, as the authors (spec §1).

    Every `<object>` counts, difficult and truncated ones included; an object whose box has zero
    width or height is skipped. An object without `<bndbox>` counts (its name is the label).

    Args:
      path: the XML file.
      class_names: the C foreground class names; label i is class_names[i].

    Returns:
      float32 (C,) multi-hot.

    Raises:
      BadExampleError: for a missing or malformed file, an object without a name, an unknown class
        name (the message lists the allowed ones) or a box of negative size.
    """
    path = epath.Path(path)
    data = read_file_bytes(path, "annotation")
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        raise BadExampleError(path, f"annotation is not valid XML ({error})") from error
    index_of = {name: index for index, name in enumerate(class_names)}
    labels = np.zeros((len(class_names),), np.float32)
    for number, element in enumerate(root.iter("object")):
        name = (element.findtext("name") or "").strip()
        if not name:
            raise BadExampleError(path, f"<object> number {number + 1} has no <name>")
        if name not in index_of:
            raise BadExampleError(
                path, f"unknown class name {name!r}; allowed: {list(class_names)}"
            )
        box = element.find("bndbox")
        if box is not None:
            width = _box_coordinate(box, "xmax", path) - _box_coordinate(box, "xmin", path)
            height = _box_coordinate(box, "ymax", path) - _box_coordinate(box, "ymin", path)
            if width < 0 or height < 0:
                raise BadExampleError(
                    path, f"object {name!r} has a box of negative size ({width} x {height})"
                )
            if width == 0 or height == 0:
                continue
        labels[index_of[name]] = 1.0
    return labels


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 (C,) multi-hot of the classes 1..C present in a mask (PSA/IRN's labels)."""
    present = np.unique(mask)
    present = present[(present >= 1) & (present <= num_classes)]
    labels = np.zeros((num_classes,), np.float32)
    labels[present.astype(np.int64) - 1] = 1.0
    return labels
