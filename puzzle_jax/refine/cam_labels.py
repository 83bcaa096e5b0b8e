"""Label maps made from class-score maps with the dense CRF: the affinity labels (spec §7) and the pseudo labels
(spec §8), one image at a time.

Both follow the authors' rule for turning scores into labels: a background channel at a threshold goes in front of
the image's foreground maps, the argmax (ties to the earlier channel, so to background) gives channel indices, the
CRF (``crf.refine_labels``, ``n_labels`` = the channels) refines them, and ``keys`` maps channels to class ids.

* Affinity labels: that rule twice on ``hr_cam``, with a high threshold (``fg``: confident foreground) and a low one
  (``bg``: confident background). A pixel keeps the fg result where it is foreground; where fg says background it is
  uncertain (255) unless bg says background too (0).
* Pseudo labels: that rule once on the random walk's ``rw``.

An image without a foreground class (``keys == [0]``) gets all background: the authors' code would call the CRF with
one label (a division by zero in the unary); with one label every pixel is background anyway.

The ``*_from_file`` functions are what ``per_image.compute_in_processes`` runs in its workers: they read the image's
score file themselves (a path pickles for nothing, its maps would cost megabytes per image) and get the image from
the parent, which decodes the split anyway. This module imports no JAX.
"""

from __future__ import annotations

import numpy as np

from puzzle_jax import cam_files
from puzzle_jax.labels import IGNORE_LABEL
from puzzle_jax.refine import crf


def _check(maps: np.ndarray, keys: np.ndarray, image: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps)
    keys = np.asarray(keys, np.int64)
    if maps.ndim != 3 or keys.ndim != 1 or len(keys) != maps.shape[0] + 1 or keys[0] != 0:
        raise ValueError(f"{source}: maps of shape {maps.shape} need keys [0, class + 1, ...]; got {keys.tolist()}.")
    if maps.shape[1:] != np.shape(image)[:2]:
        raise ValueError(
            f"{source}: the maps' size {tuple(maps.shape[1:])} differs from the image's size "
            f"{tuple(np.shape(image)[:2])}."
        )
    return maps, keys


def refined_labels(
    maps: np.ndarray, keys: np.ndarray, image: np.ndarray, *, threshold: float, iterations: int
) -> np.ndarray:
    """The authors' score-to-label rule with the CRF: background channel at ``threshold``, argmax, CRF, ``keys``.

    Args:
      maps: ``(K, H, W)`` foreground score maps of the image's classes.
      keys: ``(K + 1,)`` ``[0, class + 1, ...]`` (``cam_files``).
      image: uint8 ``(H, W, 3)`` RGB.
      threshold: the background score.
      iterations: mean-field steps of the CRF (0: none).

    Returns:
      int64 ``(H, W)`` class ids (0 background).
    """
    maps, keys = _check(maps, keys, image, "refined_labels")
    if len(keys) == 1:
        return np.zeros(maps.shape[1:], np.int64)
    background = np.full((1, *maps.shape[1:]), threshold, np.float32)
    channels = np.argmax(np.concatenate([background, maps.astype(np.float32)]), axis=0)
    return keys[crf.refine_labels(image, channels, len(keys), iterations=iterations)]


def affinity_labels(
    hr_cam: np.ndarray,
    keys: np.ndarray,
    image: np.ndarray,
    *,
    fg_threshold: float,
    bg_threshold: float,
    iterations: int,
) -> np.ndarray:
    """The affinity labels of one image (spec §7).

    Args:
      hr_cam: ``(K, H, W)`` full-resolution CAMs of the image's classes.
      keys: ``(K + 1,)`` ``[0, class + 1, ...]``.
      image: uint8 ``(H, W, 3)`` RGB.
      fg_threshold: background score of the confident-foreground map (the authors' README: 0.40).
      bg_threshold: background score of the confident-background map (README: 0.10).
      iterations: CRF mean-field steps (10).

    Returns:
      uint8 ``(H, W)``: class ids where confident, ``IGNORE_LABEL`` where not.
    """
    foreground = refined_labels(hr_cam, keys, image, threshold=fg_threshold, iterations=iterations)
    background = refined_labels(hr_cam, keys, image, threshold=bg_threshold, iterations=iterations)
    result = foreground.copy()
    result[foreground == 0] = IGNORE_LABEL
    result[(foreground == 0) & (background == 0)] = 0
    return result.astype(np.uint8)


def pseudo_labels(
    rw: np.ndarray, keys: np.ndarray, image: np.ndarray, *, threshold: float, iterations: int
) -> np.ndarray:
    """The pseudo labels of one image (spec §8): ``refined_labels`` of the random walk's maps, as uint8.

    Args:
      rw: ``(K, H, W)`` random-walk scores of the image's classes.
      keys: ``(K + 1,)`` ``[0, class + 1, ...]``.
      image: uint8 ``(H, W, 3)`` RGB.
      threshold: the background score (README: 0.35).
      iterations: CRF mean-field steps (README: 1).
    """
    return refined_labels(rw, keys, image, threshold=threshold, iterations=iterations).astype(np.uint8)


def _read_maps(cam_path: str, field: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    contents = cam_files.read_cam_file(cam_path, (field,))
    maps, keys = _check(contents[field], contents["keys"], image, cam_path)
    return maps, keys


def affinity_labels_from_file(
    job: tuple[str, np.ndarray], *, fg_threshold: float, bg_threshold: float, iterations: int
) -> np.ndarray:
    """``affinity_labels`` of ``job = (CAM file path, image)``, reading the file's ``hr_cam``.

    Raises:
      ValueError: an unreadable CAM file, or maps whose size differs from the image's (both sizes named).
    """
    cam_path, image = job
    hr_cam, keys = _read_maps(cam_path, "hr_cam", image)
    return affinity_labels(
        hr_cam, keys, image, fg_threshold=fg_threshold, bg_threshold=bg_threshold, iterations=iterations
    )


def pseudo_labels_from_file(job: tuple[str, np.ndarray], *, threshold: float, iterations: int) -> np.ndarray:
    """``pseudo_labels`` of ``job = (random-walk file path, image)``, reading the file's ``rw``.

    Raises:
      ValueError: an unreadable file, or maps whose size differs from the image's (both sizes named).
    """
    rw_path, image = job
    rw, keys = _read_maps(rw_path, "rw", image)
    return pseudo_labels(rw, keys, image, threshold=threshold, iterations=iterations)
