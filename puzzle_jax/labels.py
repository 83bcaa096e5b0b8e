"""Label maps: the ignore value, the VOC colour palette, and reading and writing label PNGs.

A label map is an (H, W) array of class ids: 0 background, 1..C classes, and `IGNORE_LABEL` (255) for pixels that
nothing learns from or scores (VOC's object borders, padding, COCO's crowd regions, uncertain pseudo-label pixels).
This module is their one owner: the datasets' masks, the transforms' padding, the scorer's ignored pixels and the
pictures' void colour all use its constant and its palette; label PNGs (ground truth, predictions) are read with
`read_label_png`, and the label folders that later stages write (affinity labels, pseudo labels, segmentation
outputs) are meant to be written with `write_label_png`, which `read_label_png` reads back exactly.

It imports nothing of the package but `fileio`, so that any module, however low, can use it.
"""

from __future__ import annotations

import functools
import io
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image

from puzzle_jax import fileio

# Label of pixels that nothing learns from or scores; the largest value a uint8 label map holds.
IGNORE_LABEL = 255

# The colour of IGNORE_LABEL in the VOC palette: cream, as VOC's object borders.
_VOID_COLOUR = (224, 224, 192)


class BadExampleError(ValueError):
    """A file of an example (image, mask, annotation) is missing or invalid; the message names the file and the problem.

    Raised by `read_label_png` and by the dataset readers (`puzzle_jax.data.readers`); the dataset builders stop on
    it or skip the example (their `on_bad_example` option).

    Attributes:
      path: the offending file.
      problem: what is wrong with it.
    """

    def __init__(self, path: os.PathLike | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def _as_path(path: Any) -> Any:
    # Path objects that read themselves (pathlib, etils' epath, which also reads gs://) are kept, so this module
    # needs no file-system library; a string is a local file.
    return path if hasattr(path, "read_bytes") else pathlib.Path(path)


def read_file_bytes(path: Any, what: str) -> bytes:
    """Reads the whole content of one file of an example.

    Args:
      path: the file: a string (local file) or a path object with `read_bytes` (pathlib, etils epath).
      what: what the file is ("image", "mask", ...), for the messages.

    Returns:
      The file's bytes.

    Raises:
      BadExampleError: for a missing, unreadable or empty file.
    """
    path = _as_path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadExampleError(path, f"{what} file is missing") from None
    except OSError as error:
        raise BadExampleError(path, f"{what} file is unreadable ({error})") from error
    if not data:
        raise BadExampleError(path, f"{what} file is empty")
    return data


# --------------------------------------------------------------------------------------------------
# The VOC palette.
# --------------------------------------------------------------------------------------------------


def _voc_colour_map() -> np.ndarray:
    """The VOC devkit's colour map rule: the bits of a label, 3 at a time, spread over the top bits of R, G, B."""
    palette = np.zeros((256, 3), np.uint8)
    for label in range(256):
        red = green = blue = 0
        code = label
        for bit in range(8):
            red |= ((code >> 0) & 1) << (7 - bit)
            green |= ((code >> 1) & 1) << (7 - bit)
            blue |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette[label] = (red, green, blue)
    palette[IGNORE_LABEL] = _VOID_COLOUR
    return palette


@functools.cache
def _cached_palette() -> np.ndarray:
    palette = _voc_colour_map()
    # Read-only so a caller cannot corrupt the shared cache by writing into it.
    palette.setflags(write=False)
    return palette


def voc_palette() -> np.ndarray:
    """Returns the VOC colour map.

    Returns:
      ``(256, 3)`` uint8 array; row ``i`` is the RGB colour of label ``i`` (0 background is black, 255 void is
      ``(224, 224, 192)``). A fresh, writable copy.
    """
    return _cached_palette().copy()


# --------------------------------------------------------------------------------------------------
# Checking, reading and writing label maps.
# --------------------------------------------------------------------------------------------------


def check_label_map(label_map: np.ndarray) -> np.ndarray:
    """Checks that ``label_map`` is a label map that a uint8 image can hold.

    Args:
      label_map: ``(H, W)`` integer labels in ``[0, 255]`` (255 is void).

    Returns:
      ``label_map`` as an array (not converted).

    Raises:
      ValueError: if ``label_map`` is not 2-D, not integer, or holds values outside ``[0, 255]``.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label_map must have shape (H, W), got {label_map.shape}.")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label_map must hold integer labels, got dtype {label_map.dtype}.")
    if label_map.size and (label_map.min() < 0 or label_map.max() > IGNORE_LABEL):
        raise ValueError(
            f"label_map values must lie in [0, {IGNORE_LABEL}], got [{label_map.min()}, {label_map.max()}]."
        )
    return label_map


def check_mask_values(mask: np.ndarray, path: Any, num_classes: int) -> np.ndarray:
    """Returns ``mask`` when all its values are 0 (background), 1..num_classes or IGNORE_LABEL.

    Raises:
      BadExampleError: naming ``path`` and the first values that are not a class.
    """
    values = np.unique(mask)
    bad = values[(values > num_classes) & (values != IGNORE_LABEL)]
    if bad.size:
        raise BadExampleError(
            path,
            f"mask has value(s) {bad.tolist()[:10]} that are not a class; allowed: 0 (background), "
            f"1..{num_classes} (classes) and {IGNORE_LABEL} (ignored)",
        )
    return mask


def _colour_mask_to_classes(rgb: np.ndarray, path: Any, num_classes: int) -> np.ndarray:
    """Maps a colour-coded mask (VOC colour map) back to class ids."""
    palette = _cached_palette().astype(np.int64)
    codes_of_palette = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    allowed = list(range(num_classes + 1)) + [IGNORE_LABEL]
    class_of_code = {int(codes_of_palette[value]): value for value in allowed}
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    unique_codes, inverse = np.unique(codes, return_inverse=True)
    unknown = [int(code) for code in unique_codes if int(code) not in class_of_code]
    if unknown:
        colours = [((code >> 16) & 255, (code >> 8) & 255, code & 255) for code in unknown[:5]]
        raise BadExampleError(
            path,
            f"colour mask has RGB colour(s) {colours} that are not in the VOC colour map of "
            f"classes 0..{num_classes} and {IGNORE_LABEL}; save masks as palette or grey PNGs of "
            "class ids",
        )
    lookup = np.array([class_of_code[int(code)] for code in unique_codes], np.uint8)
    return lookup[inverse.reshape(codes.shape)]


def read_label_png(path: Any, num_classes: int) -> np.ndarray:
    """Reads a label PNG as uint8 class ids (0 background, 1..C, 255 ignored).

    Palette PNGs (VOC's `SegmentationClass`, `write_label_png`'s) give their palette indices, grey PNGs
    (`SegmentationClassAug`) their values, and colour PNGs are mapped through the VOC colour map.

    Args:
      path: the PNG: a string (local file) or a path object with `read_bytes` (pathlib, etils epath).
      num_classes: number of foreground classes C.

    Returns:
      uint8 (H, W).

    Raises:
      BadExampleError: for a missing, corrupt or unsupported file, an unknown colour or a value that is not a class.
    """
    path = _as_path(path)
    data = read_file_bytes(path, "mask")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            if mode in ("P", "L"):
                mask = np.asarray(image, np.uint8)
            elif mode in ("RGB", "RGBA"):
                mask = _colour_mask_to_classes(np.asarray(image.convert("RGB")), path, num_classes)
            elif mode in ("I", "I;16", "I;16B"):
                values = np.asarray(image)
                if values.min() < 0 or values.max() > 255:
                    raise BadExampleError(path, "mask has values outside 0..255")
                mask = values.astype(np.uint8)
            else:
                raise BadExampleError(path, f"mask has unsupported image mode {mode!r}")
    except BadExampleError:
        raise
    except Exception as error:  # PIL raises many types for corrupt files.
        raise BadExampleError(path, f"mask is corrupt or not an image ({error})") from error
    return check_mask_values(mask, path, num_classes)


def write_label_png(path: str | os.PathLike, label_map: np.ndarray) -> None:
    """Writes a label map as a palette PNG in the VOC colours, atomically.

    The pixels are the labels themselves (palette indices), so `read_label_png` gives them back exactly, while any
    image viewer shows the VOC colours (255 in the void colour).

    Args:
      path: the output file; must end in ``.png``. Its folder is created if needed.
      label_map: ``(H, W)`` integer labels in ``[0, 255]``.

    Raises:
      ValueError: for a path not ending in ``.png``, or a label map that is not 2-D, not integer or holds values
        outside ``[0, 255]``.
    """
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"{path}: a label PNG path must end in '.png'.")
    label_map = check_label_map(label_map)
    # A grey image with a palette attached becomes a palette ("P") image with the labels as its indices.
    image = Image.fromarray(label_map.astype(np.uint8))
    image.putpalette(_cached_palette().tobytes())
    with fileio.atomic_path(path) as temporary:
        image.save(temporary, format="PNG")
