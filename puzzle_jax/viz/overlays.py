"""Blends class activation maps and label maps onto images, for looking at them."""

from __future__ import annotations

import cv2
import numpy as np

from puzzle_jax.viz import palette


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {image.shape} and dtype {image.dtype}.")
    return image


def _blend(image: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def heat_map(cam: np.ndarray) -> np.ndarray:
    """Colours a CAM with the JET colour map (blue cold, red hot).

    Args:
      cam: ``(H, W)`` float scores; values are clipped to ``[0, 1]`` and NaN counts as 0.

    Returns:
      ``(H, W, 3)`` uint8 RGB image.
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam must have shape (H, W), got {cam.shape}.")
    scores = np.clip(np.nan_to_num(cam, nan=0.0), 0.0, 1.0)
    # applyColorMap works on uint8 and returns BGR; the rest of the project is RGB.
    bgr = cv2.applyColorMap(np.rint(scores * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def cam_overlay(image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
    """Blends a JET heat map of ``cam`` onto ``image``.

    Args:
      image: ``(H, W, 3)`` uint8 RGB image.
      cam: ``(h, w)`` float CAM in ``[0, 1]``; resized bilinearly to ``(H, W)`` when its size differs (e.g. the
        strided CAM), so it lines up with the image.
      alpha: weight of the heat map (0.5 is the usual 50/50 blend).

    Returns:
      ``(H, W, 3)`` uint8 RGB image.
    """
    image = _check_image(image)
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam must have shape (H, W), got {cam.shape}.")
    height, width = image.shape[:2]
    if cam.shape != (height, width):
        cam = cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)
    return _blend(image, heat_map(cam), alpha)


def label_overlay(image: np.ndarray, label_map: np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
    """Blends the VOC colours of ``label_map`` onto ``image``, leaving background pixels untouched.

    Background (0) is black in the VOC palette; blending it would only darken the image, so those pixels keep the
    image's colours and the objects (and void, 255) stand out.

    Args:
      image: ``(H, W, 3)`` uint8 RGB image.
      label_map: ``(H, W)`` integer labels in ``[0, 255]``.
      alpha: weight of the label colours.

    Returns:
      ``(H, W, 3)`` uint8 RGB image.
    """
    image = _check_image(image)
    label_map = np.asarray(label_map)
    if label_map.shape != image.shape[:2]:
        raise ValueError(f"label_map shape {label_map.shape} differs from image shape {image.shape[:2]}.")
    blended = _blend(image, palette.colorize_labels(label_map), alpha)
    return np.where((label_map != 0)[..., None], blended, image)
