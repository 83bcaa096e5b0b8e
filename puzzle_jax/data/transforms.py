"""Host-side image transforms (numpy, PIL): the classifier augmentation of spec §4, eval padding.

This module owns what happens to an image between the data source and the device:

* train: random long-side rescale to an integer in [min, max] keeping the aspect ratio (PIL bicubic
  for images, nearest for masks), horizontal flip with p=0.5, normalisation ((RGB/255 - mean) / std
  with the ImageNet statistics), and a random `crop_size` crop; an image smaller than the crop along
  a side is pasted at a random offset on a zero canvas (zero is the mean colour after
  normalisation), and masks are padded with 255 (ignored). The loader stops before the
  normalisation (`train_crop`: a uint8 crop and the box of the image on it, a quarter of the bytes
  to batch, pass between processes and copy to the device); `normalize_crops` finishes it on the
  device, inside the jitted step, bit for bit as on the host. CAM inference sends its padded
  inputs the same way.
* eval: normalisation and padding at the bottom/right to a fixed size or to a multiple (mask padded
  with 255).

Every random choice is drawn from an explicit `np.random.Generator`, so a transform is a pure
function of its inputs and the generator state.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from PIL import Image

from puzzle_jax.labels import IGNORE_LABEL

# ImageNet statistics used by the authors' normalisation (RGB order).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize_image(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Returns (image / 255 - IMAGENET_MEAN) / IMAGENET_STD as float32.

    Args:
      image: uint8 (H, W, 3) RGB.
      out: optional float32 (H, W, 3) array (e.g. a slot of a batch) to write the result into.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"Expected an (H, W, 3) RGB image; got shape {image.shape}.")
    # The same float32 operations in the same order, in place: no temporaries (a third of the host time of
    # multi-scale inference went to this function's copies; benchmarks/inference_host.py).
    if out is None:
        normalised = image.astype(np.float32)
    else:
        normalised = out
        normalised[...] = image
    normalised /= 255.0
    normalised -= IMAGENET_MEAN
    normalised /= IMAGENET_STD
    return normalised


# normalize_image of every uint8 level in each channel: (256, 3) float32, the table normalize_crops reads.
_NORMALIZED_LEVELS = normalize_image(np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(1, 256, 3))[0]


def rescale_long_side(
    image: np.ndarray, mask: np.ndarray | None, long_side: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resizes so that the longer side equals `long_side`, keeping the aspect ratio.

    The shorter side becomes round(short * long_side / long), at least 1. Images use PIL bicubic
    (as the authors), masks nearest neighbour (labels must not be blended).

    Args:
      image: uint8 (H, W, 3).
      mask: uint8 (H, W) or None.
      long_side: target length of the longer side, in pixels.

    Returns:
      (image, mask) resized; mask stays None when None.
    """
    if long_side < 1:
        raise ValueError(f"long_side must be positive; got {long_side}.")
    height, width = image.shape[:2]
    scale = long_side / max(height, width)
    if height >= width:
        new_height, new_width = long_side, max(1, round(width * scale))
    else:
        new_height, new_width = max(1, round(height * scale)), long_side
    if (new_height, new_width) == (height, width):
        return image, mask
    resized_image = np.asarray(
        Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BICUBIC)
    )
    resized_mask = None
    if mask is not None:
        resized_mask = np.asarray(
            Image.fromarray(mask).resize((new_width, new_height), Image.Resampling.NEAREST)
        )
    return resized_image, resized_mask


def random_rescale_long_side(
    image: np.ndarray,
    mask: np.ndarray | None,
    *,
    min_long_side: int,
    max_long_side: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rescales the longer side to an integer drawn uniformly in [min_long_side, max_long_side]."""
    if not 1 <= min_long_side <= max_long_side:
        raise ValueError(
            "The rescale range must satisfy 1 <= min <= max; "
            f"got ({min_long_side}, {max_long_side})."
        )
    long_side = int(rng.integers(min_long_side, max_long_side + 1))
    return rescale_long_side(image, mask, long_side)


def random_horizontal_flip(
    image: np.ndarray,
    mask: np.ndarray | None,
    *,
    rng: np.random.Generator,
    probability: float = 0.5,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mirrors image and mask left-right with the given probability."""
    if rng.uniform() < probability:
        return image[:, ::-1], (None if mask is None else mask[:, ::-1])
    return image, mask


def _crop_or_pad_offsets(size: int, crop_size: int, rng: np.random.Generator) -> tuple[int, int]:
    """(source start, canvas start) along one axis: a random window when the image is longer than
    the crop, a random paste position when it is shorter."""
    if size >= crop_size:
        return int(rng.integers(0, size - crop_size + 1)), 0
    return 0, int(rng.integers(0, crop_size - size + 1))


def random_crop(
    image: np.ndarray,
    mask: np.ndarray | None,
    *,
    crop_size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Random `crop_size` square crop; sides shorter than the crop are pasted at a random offset.

    Each axis is handled on its own: along an axis longer than the crop a random window is taken,
    along a shorter one the whole extent is placed at a random position of the canvas.

    Args:
      image: (H, W, C) array: normalised (the zero fill is then the mean colour), or uint8 with
        the normalisation left to `normalize_crops`, which uses the box.
      mask: uint8 (H, W) or None; its canvas is filled with IGNORE_LABEL.
      crop_size: side of the output square.
      rng: random generator.

    Returns:
      (image, mask) of spatial size (crop_size, crop_size), and the box int32 (top, left, height,
      width) of the canvas that holds image pixels (the rest is fill).
    """
    if crop_size < 1:
        raise ValueError(f"crop_size must be positive; got {crop_size}.")
    height, width = image.shape[:2]
    source_top, canvas_top = _crop_or_pad_offsets(height, crop_size, rng)
    source_left, canvas_left = _crop_or_pad_offsets(width, crop_size, rng)
    copy_height, copy_width = min(height, crop_size), min(width, crop_size)
    source_window = (
        slice(source_top, source_top + copy_height),
        slice(source_left, source_left + copy_width),
    )
    canvas_window = (
        slice(canvas_top, canvas_top + copy_height),
        slice(canvas_left, canvas_left + copy_width),
    )
    cropped_image = np.zeros((crop_size, crop_size) + image.shape[2:], image.dtype)
    cropped_image[canvas_window] = image[source_window]
    cropped_mask = None
    if mask is not None:
        cropped_mask = np.full((crop_size, crop_size), IGNORE_LABEL, np.uint8)
        cropped_mask[canvas_window] = mask[source_window]
    box = np.array([canvas_top, canvas_left, copy_height, copy_width], np.int32)
    return cropped_image, cropped_mask, box


def train_crop(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    crop_size: int,
    rescale_range: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The classifier augmentation of spec §4 up to the normalisation: rescale, flip, crop.

    Draws the same random numbers in the same order as `train_transform`, which is this followed by
    the normalisation; the loader ships this uint8 crop and `normalize_crops` normalises it on the
    device.

    Args:
      image: uint8 (H, W, 3) RGB.
      mask: uint8 (H, W) or None (the classifier needs no mask; tests and visualisations do).
      crop_size: side of the square output.
      rescale_range: inclusive (min, max) of the random long side.
      rng: the only source of randomness.

    Returns:
      image uint8 (crop_size, crop_size, 3) with zeros around the image, mask uint8
      (crop_size, crop_size) or None, and the box int32 (top, left, height, width) of the image
      on the canvas.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 RGB image; got dtype {image.dtype}.")
    image, mask = random_rescale_long_side(
        image, mask, min_long_side=rescale_range[0], max_long_side=rescale_range[1], rng=rng
    )
    image, mask = random_horizontal_flip(image, mask, rng=rng)
    return random_crop(image, mask, crop_size=crop_size, rng=rng)


def train_transform(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    crop_size: int,
    rescale_range: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole classifier augmentation of spec §4 on the host: `train_crop`, then normalisation.

    Returns:
      image float32 (crop_size, crop_size, 3), normalised, zero (the mean colour) outside the
      image; mask uint8 (crop_size, crop_size) or None.
    """
    crop, mask, box = train_crop(
        image, mask, crop_size=crop_size, rescale_range=rescale_range, rng=rng
    )
    normalised = np.zeros(crop.shape, np.float32)
    top, left, height, width = (int(value) for value in box)
    window = (slice(top, top + height), slice(left, left + width))
    normalize_image(crop[window], out=normalised[window])
    return normalised, mask


def normalize_crops(images: jnp.ndarray, boxes: jnp.ndarray) -> jnp.ndarray:
    """`normalize_image` of a batch of uint8 crops (`train_crop`'s, or CAM inference's padded
    inputs), in JAX: on the device, inside the jitted computation.

    Each value is looked up in `normalize_image`'s own result for the 256 levels of each channel,
    so the device produces the host's float32 values bit for bit (XLA computes the division by 255
    as a multiplication, up to 1 ulp off), and zero, the mean colour, outside each crop's box, as
    `train_transform` does on the host. The lookup is a gather from a 768-value table: one pass
    over the input on a GPU; its cost on a TPU is not measured yet.

    Args:
      images: uint8 (B, H, W, 3).
      boxes: int (B, 4): (top, left, height, width) of each image on its canvas.

    Returns:
      float32 (B, H, W, 3).
    """
    levels = jnp.asarray(_NORMALIZED_LEVELS)
    normalised = levels[images.astype(jnp.int32), jnp.arange(3)]
    rows = jnp.arange(images.shape[1])[None, :, None]
    columns = jnp.arange(images.shape[2])[None, None, :]
    top, left, height, width = (boxes[:, index, None, None] for index in range(4))
    inside = (rows >= top) & (rows < top + height) & (columns >= left) & (columns < left + width)
    return jnp.where(inside[..., None], normalised, jnp.float32(0.0))


def padded_size(
    height: int,
    width: int,
    *,
    pad_to: tuple[int, int] | None = None,
    pad_multiple: int | None = None,
) -> tuple[int, int]:
    """The (height, width) after eval padding: `pad_to` if given, then rounded up to a multiple."""
    if pad_to is not None:
        if pad_to[0] < height or pad_to[1] < width:
            raise ValueError(
                f"pad_to={tuple(pad_to)} is smaller than the image size ({height}, {width})."
            )
        height, width = pad_to
    if pad_multiple is not None:
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be positive; got {pad_multiple}.")
        height = math.ceil(height / pad_multiple) * pad_multiple
        width = math.ceil(width / pad_multiple) * pad_multiple
    return height, width


def eval_transform(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    pad_to: tuple[int, int] | None = None,
    pad_multiple: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalises and pads at the bottom and right (image with 0, the mean colour; mask with 255).

    Args:
      image: uint8 (H, W, 3) RGB.
      mask: uint8 (H, W) or None.
      pad_to: (height, width) to pad to; must not be smaller than the image.
      pad_multiple: round the (padded) size up to a multiple of this, e.g. 16 x puzzle grid.

    Returns:
      image float32 (H', W', 3) with the original at the top left, mask uint8 (H', W') or None.
    """
    height, width = image.shape[:2]
    target_height, target_width = padded_size(
        height, width, pad_to=pad_to, pad_multiple=pad_multiple
    )
    padded_image = np.zeros((target_height, target_width, 3), np.float32)
    padded_image[:height, :width] = normalize_image(image)
    padded_mask = None
    if mask is not None:
        padded_mask = np.full((target_height, target_width), IGNORE_LABEL, np.uint8)
        padded_mask[:height, :width] = mask
    return padded_image, padded_mask


def downscale_labels(label_map: np.ndarray, factor: int) -> np.ndarray:
    """Reduces a label map by an integer ``factor`` with nearest neighbour (PIL), as the authors reduce a 512 crop's
    affinity labels to the 128 x 128 stride-4 grid (spec §8): output pixel ``i`` takes input pixel
    ``factor * i + factor // 2``."""
    height, width = label_map.shape
    if factor < 1 or height % factor or width % factor:
        raise ValueError(f"A {height}x{width} label map cannot be reduced by a factor of {factor}.")
    size = (width // factor, height // factor)
    return np.asarray(Image.fromarray(np.asarray(label_map, np.uint8)).resize(size, Image.Resampling.NEAREST))


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes a uint8 RGB image to (height, width) with PIL bicubic, as the authors (spec §5)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))
