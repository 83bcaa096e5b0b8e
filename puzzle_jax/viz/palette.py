"""Label-map colouring in the VOC colours.

The VOC colour map itself (and the void label) is owned by ``puzzle_jax.labels``; this module only applies it.
"""

from __future__ import annotations

import numpy as np

from puzzle_jax.labels import check_label_map, voc_palette


def colorize_labels(label_map: np.ndarray) -> np.ndarray:
    """Paints a label map with the VOC colours.

    Args:
      label_map: ``(H, W)`` integer labels in ``[0, 255]`` (255 is void).

    Returns:
      ``(H, W, 3)`` uint8 RGB image.

    Raises:
      ValueError: if ``label_map`` is not 2-D, not integer, or holds values outside ``[0, 255]``.
    """
    label_map = check_label_map(label_map)
    return voc_palette()[label_map.astype(np.intp)]
