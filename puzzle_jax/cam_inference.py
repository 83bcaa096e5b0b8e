"""Multi-scale + flip CAMs of one image from an exported classifier (spec §5).

For each scale the image is resized on the host (PIL bicubic, as the authors), normalised, batched with its
horizontal flip and padded up to a multiple of ``pad_multiple`` so that XLA compiles once per size bucket. The
class maps of the valid region go through ReLU, the flipped map is flipped back and added, and the sum over scales
is accumulated at two resolutions with bilinear (align_corners=False) resizing: the strided map
``(ceil(H/4), ceil(W/4))`` for the random walk and the full-resolution map for evaluation (resized to the next
multiples of 16, then cropped to ``(H, W)``, as the authors do). Only the
image's ground-truth classes are kept, each divided by its own spatial maximum (+1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from puzzle_jax import puzzle
from puzzle_jax.data import transforms

# Added to each class's maximum before dividing, as the authors do, so an all-zero map stays zero.
NORMALISATION_EPSILON = 1e-5


def create_forward(model: nnx.Module) -> Callable[[np.ndarray], np.ndarray]:
    """Returns ``images (N, H, W, 3) -> ReLU'd class maps (N, h, w, C)`` as numpy, jitted per input shape."""
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, images):
        _, class_maps = nnx.merge(graphdef, state)(images)
        return jax.nn.relu(class_maps.astype(jnp.float32))

    return lambda images: np.asarray(forward(state, jnp.asarray(images)))


def _resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear, half-pixel centres (PyTorch align_corners=False), no antialiasing; ``maps`` is (h, w, C)."""
    if maps.shape[:2] == (height, width):
        return maps
    channels = maps.shape[-1]
    # OpenCV handles at most 512 channels per call.
    pieces = [
        cv2.resize(maps[..., start : start + 512], (width, height), interpolation=cv2.INTER_LINEAR)
        for start in range(0, channels, 512)
    ]
    pieces = [piece[..., None] if piece.ndim == 2 else piece for piece in pieces]
    return np.concatenate(pieces, axis=-1)


def compute_cams(
    forward: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    labels: np.ndarray,
    *,
    scales: Sequence[float],
    flip: bool,
    pad_multiple: int,
    output_stride: int,
) -> dict[str, np.ndarray]:
    """Computes the ``.npz`` payload of one image.

    Args:
      forward: from ``create_forward``.
      image: uint8 RGB ``(H, W, 3)``.
      labels: multi-hot ``(C,)`` image-level labels; the maps of these classes are kept.
      scales: input scales (the authors: 0.5, 1.0, 1.5, 2.0).
      flip: also run the horizontally flipped image and add its flipped-back maps.
      pad_multiple: inputs are zero-padded (after normalisation) up to a multiple of this.
      output_stride: the classifier's output stride (to find the valid region of its maps).

    Returns:
      ``keys`` int64 ``(K + 1,)`` = [0, c1 + 1, ...] (background first, class ids 1-based), ``cam`` float32
      ``(K, ceil(H/4), ceil(W/4))`` and ``hr_cam`` float32 ``(K, H, W)``, both max-normalised per class.
    """
    height, width = image.shape[:2]
    strided_size = (math.ceil(height / 4), math.ceil(width / 4))
    strided_sum = 0.0
    full_sum = 0.0
    for scale in scales:
        scaled_height, scaled_width = round(height * scale), round(width * scale)
        scaled = transforms.resize_image(image, scaled_height, scaled_width)
        normalised = transforms.normalize_image(scaled)
        batch = np.stack([normalised, normalised[:, ::-1]]) if flip else normalised[None]
        padded, _ = puzzle.pad_to_multiple(batch, max(pad_multiple, output_stride))
        maps = forward(np.asarray(padded))
        valid_height = math.ceil(scaled_height / output_stride)
        valid_width = math.ceil(scaled_width / output_stride)
        maps = maps[:, :valid_height, :valid_width]
        summed = maps[0] + maps[1][:, ::-1] if flip else maps[0]
        strided_sum = strided_sum + _resize_maps(summed, *strided_size)
        # The authors upsample to the next multiple of 16 and crop, rather than resizing to (H, W) directly.
        upsampled = _resize_maps(summed, 16 * math.ceil(height / 16), 16 * math.ceil(width / 16))
        full_sum = full_sum + upsampled[:height, :width]
    class_ids = np.flatnonzero(np.asarray(labels) > 0)
    return {
        "keys": np.concatenate([[0], class_ids + 1]).astype(np.int64),
        "cam": _normalise(strided_sum[..., class_ids]),
        "hr_cam": _normalise(full_sum[..., class_ids]),
    }


def _normalise(maps: np.ndarray) -> np.ndarray:
    """(h, w, K) -> (K, h, w), each map divided by its own maximum + epsilon."""
    maps = np.moveaxis(np.asarray(maps, np.float32), -1, 0)
    maxima = maps.reshape(maps.shape[0], -1).max(axis=1) if maps.size else np.zeros(0, np.float32)
    return maps / (maxima[:, None, None] + NORMALISATION_EPSILON)
