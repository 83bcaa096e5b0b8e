"""The PASCAL VOC colour map and label-map colouring.

The bit-shuffling rule that defines the VOC colours lives in ``puzzle_jax.data.demo.segmentation_palette`` (it also
colours the demo data's masks); this module only caches it and applies it, so there is one definition of the palette.
"""

from __future__ import annotations

import functools

import numpy as np

from puzzle_jax.data import demo

VOID_LABEL = 255


@functools.cache
def _cached_palette() -> np.ndarray:
    palette = demo.segmentation_palette()
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


def colorize_labels(label_map: np.ndarray) -> np.ndarray:
    """Paints a label map with the VOC colours.

    Args:
      label_map: ``(H, W)`` integer labels in ``[0, 255]`` (255 is void).

    Returns:
      ``(H, W, 3)`` uint8 RGB image.

    Raises:
      ValueError: if ``label_map`` is not 2-D, not integer, or holds values outside ``[0, 255]``.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label_map must have shape (H, W), got {label_map.shape}.")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label_map must hold integer labels, got dtype {label_map.dtype}.")
    if label_map.size and (label_map.min() < 0 or label_map.max() > VOID_LABEL):
        raise ValueError(
            f"label_map values must lie in [0, {VOID_LABEL}], got [{label_map.min()}, {label_map.max()}]."
        )
    return _cached_palette()[label_map.astype(np.intp)]
