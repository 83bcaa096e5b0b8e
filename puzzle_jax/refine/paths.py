"""Path geometry between pixel pairs: the search directions, the grid points of each path, and the pairs' labels.

Owns the geometry of IRN's ``PathIndex`` as the authors use it (spec §8): which pixel pairs an affinity relates,
which grid points lie on the path between them, and the layout in which pair-wise quantities are stored. The
AffinityNet loss (training, radius 10) and the random walk (inference, radius 5) both read it.

Geometry, for a radius ``r`` (an integer; the authors use 10 and 5):

- Search directions ``(dy, dx)``: ``(0, x)`` for ``x = 1..r-1``, then ``(y, x)`` for ``y = 1..r-1`` and
  ``x = -(r-1)..r-1`` with ``x² + y² < r²``, in that order. They cover one half-plane, so every unordered pair of
  pixels closer than ``r`` is counted once.
- The path of a direction: the grid points ``(y, x)`` of the bounding box of ``(0, 0)`` and ``(dy, dx)`` whose
  distance to the line through them is below 1. Both ends are on it.
- Sources: rows ``[0, H-(r-1))`` and columns ``[r-1, W-(r-1))``; the destination of a source ``p`` in direction
  ``d`` is ``p + d``, which always lies inside the map.

Layout (our own, not IRN's): every pair-wise quantity is an array ``(B, D, Hs, Ws)`` indexed by direction and by
source position inside the source window, where ``D`` is the number of directions and ``Hs x Ws`` the window. IRN
flattens the sources and groups the directions by path length (with a per-group index tensor gathered from the
flattened map); we keep one direction per slot in the order above and compute everything with shifted slices,
which is the same set of (source, destination, path) triples, so losses that average over pairs are identical.
"""

import jax.numpy as jnp
import numpy as np

from puzzle_jax import labels


def _check_radius(radius: int) -> int:
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 2:
        raise ValueError(f"radius must be an integer >= 2 (a radius of 1 has no directions), got {radius!r}.")
    return int(radius)


def search_directions(radius: int) -> np.ndarray:
    """The search directions of a radius, in the authors' order.

    Args:
      radius: the search radius ``r``; a direction ``(dy, dx)`` has ``dy² + dx² < r²``.

    Returns:
      ``(D, 2)`` int array of ``(dy, dx)``: ``(0, x)`` for ``x = 1..r-1``, then ``(y, x)`` for ``y = 1..r-1`` and
      ``x = -(r-1)..r-1`` (row by row). ``D`` is 34 at radius 5 and 152 at radius 10.
    """
    radius = _check_radius(radius)
    directions = [(0, dx) for dx in range(1, radius)]
    directions += [
        (dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dx * dx + dy * dy < radius * radius
    ]
    return np.asarray(directions, dtype=np.int64)


def path_offsets(radius: int) -> list[np.ndarray]:
    """The grid points on the path of each search direction, as offsets from the source.

    A point ``(y, x)`` is on the path of ``(dy, dx)`` when it lies in the bounding box of ``(0, 0)`` and
    ``(dy, dx)`` and its distance to the line through them is below 1 (``(dy·x - dx·y)² / (dy² + dx²) < 1``). The
    source ``(0, 0)`` and the destination ``(dy, dx)`` are both included. Points are ordered from the far end inwards
    (decreasing ``|y| + |x|``, ties in row-major box order), so the destination comes first and the source last.

    Args:
      radius: the search radius.

    Returns:
      One ``(L_d, 2)`` int array of ``(y, x)`` offsets per direction of ``search_directions(radius)``.
    """
    paths = []
    for dy, dx in search_directions(radius).tolist():
        length_squared = dy * dy + dx * dx
        points = [
            (y, x)
            for y in range(min(0, dy), max(0, dy) + 1)
            for x in range(min(0, dx), max(0, dx) + 1)
            if (dy * x - dx * y) ** 2 < length_squared
        ]
        # A stable sort keeps the box order among points equally far away, as the authors' sort does.
        points.sort(key=lambda point: -abs(point[0]) - abs(point[1]))
        paths.append(np.asarray(points, dtype=np.int64))
    return paths


def source_window(height: int, width: int, radius: int) -> tuple[slice, slice]:
    """The source rows and columns of a ``height x width`` map: rows ``[0, H-(r-1))``, columns ``[r-1, W-(r-1))``.

    Every destination ``source + (dy, dx)`` of every direction lies inside the map.

    Raises:
      ValueError: if the map is too small to hold a source (``H < r`` or ``W < 2r - 1``).
    """
    radius = _check_radius(radius)
    margin = radius - 1
    if height - margin < 1 or width - 2 * margin < 1:
        raise ValueError(
            f"A {height}x{width} map has no source pixel at radius {radius}: it needs at least {radius} rows and "
            f"{2 * radius - 1} columns (pad it first)."
        )
    return slice(0, height - margin), slice(margin, width - margin)


def _shifted(array: jnp.ndarray, offset_y: int, offset_x: int, window: tuple[slice, slice]) -> jnp.ndarray:
    """``array[..., source + offset]`` for every source of the window (the last two axes are rows and columns)."""
    rows, cols = window
    return array[
        ...,
        rows.start + offset_y : rows.stop + offset_y,
        cols.start + offset_x : cols.stop + offset_x,
    ]


def path_max_affinity(edge: jnp.ndarray, radius: int) -> jnp.ndarray:
    """The affinity of every (source, destination) pair: one minus the largest edge value along their path.

    Pure jnp (shifted slices and elementwise maxima), differentiable, in the dtype of ``edge``.

    Args:
      edge: ``(B, H, W)`` edge (boundary) probabilities in ``[0, 1]``.
      radius: the search radius.

    Returns:
      ``(B, D, Hs, Ws)``: slot ``[b, d, i, j]`` relates source ``(i, j + r - 1)`` and its destination in direction
      ``d`` of ``search_directions(radius)``.

    Raises:
      ValueError: if ``edge`` is not rank 3 or too small for the radius.
    """
    if edge.ndim != 3:
        raise ValueError(f"edge must be (B, H, W), got shape {tuple(edge.shape)}.")
    window = source_window(edge.shape[1], edge.shape[2], radius)
    per_direction = []
    for path in path_offsets(radius):
        path_max = _shifted(edge, *path[0], window)
        for offset_y, offset_x in path[1:]:
            path_max = jnp.maximum(path_max, _shifted(edge, offset_y, offset_x, window))
        per_direction.append(path_max)
    return 1 - jnp.stack(per_direction, axis=1)


def pair_labels(label_maps: jnp.ndarray, radius: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The class relation of every (source, destination) pair, in the layout of ``path_max_affinity``.

    A pair counts only when both ends are valid (not ``labels.IGNORE_LABEL``).

    Args:
      label_maps: ``(B, H, W)`` integer label maps (0 background, classes > 0, ``IGNORE_LABEL`` void).
      radius: the search radius.

    Returns:
      ``(bg_positive, fg_positive, negative)``, bool ``(B, D, Hs, Ws)`` each: both ends background; both ends the same
      foreground class; the ends of different classes.

    Raises:
      ValueError: if ``label_maps`` is not rank 3 or too small for the radius.
    """
    if label_maps.ndim != 3:
        raise ValueError(f"label_maps must be (B, H, W), got shape {tuple(label_maps.shape)}.")
    label_maps = jnp.asarray(label_maps)
    window = source_window(label_maps.shape[1], label_maps.shape[2], radius)
    source = _shifted(label_maps, 0, 0, window)[:, None]
    destination = jnp.stack(
        [_shifted(label_maps, dy, dx, window) for dy, dx in search_directions(radius).tolist()], axis=1
    )
    both_valid = (source != labels.IGNORE_LABEL) & (destination != labels.IGNORE_LABEL)
    same = both_valid & (source == destination)
    return same & (source == 0), same & (source > 0), both_valid & (source != destination)
