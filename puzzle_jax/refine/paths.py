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
flattened map); we keep one direction per slot in the order above and compute with shifted slices of the map,
which is the same set of (source, destination, path) triples, so losses that average over pairs are identical.
"""

import jax
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


def _path_table(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct offsets on any path, and each path as indices into them.

    Returns:
      ``(offsets (U, 2), table (D, L))``: ``table[d, l]`` is the index of the ``l``-th point of path ``d`` (far end
      first); paths shorter than the longest ``L`` repeat their destination, which changes no maximum.
    """
    path_list = path_offsets(radius)
    offsets = sorted({tuple(point) for path in path_list for point in path.tolist()})
    index_of = {offset: index for index, offset in enumerate(offsets)}
    longest = max(len(path) for path in path_list)
    table = np.asarray(
        [
            [index_of[tuple(point)] for point in path.tolist()] + [index_of[tuple(path[0])]] * (longest - len(path))
            for path in path_list
        ]
    )
    return np.asarray(offsets, dtype=np.int64), table


def path_max_affinity(edge: jnp.ndarray, radius: int) -> jnp.ndarray:
    """The affinity of every (source, destination) pair: one minus the largest edge value along their path.

    Pure jnp, differentiable, in the dtype of ``edge``. The gradient reaches the path's maximum only: its first
    occurrence from the far end when values tie, as the authors' ``max_pool2d`` over paths ordered far end first.

    How (so that radius 10 compiles in seconds and trains in linear memory): the maps of the distinct path offsets
    (``U`` = 162 at radius 10, 39 at radius 5) are cut once; a search without gradient walks the ``L`` path positions
    (22 at radius 10), keeping the running maximum of every direction and which offset holds it; the result is then
    one gather of ``edge`` at those positions, so the backward pass is a single scatter-add instead of the residuals
    of thousands of elementwise maxima.

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
    batch, height, width = edge.shape
    window = source_window(height, width, radius)
    offsets, table = _path_table(radius)
    searched = jax.lax.stop_gradient(edge)
    by_offset = jnp.stack([_shifted(searched, dy, dx, window) for dy, dx in offsets.tolist()], axis=1)
    best_value = by_offset[:, table[:, 0]]
    best_offset = jnp.broadcast_to(jnp.asarray(table[:, 0], jnp.int32)[None, :, None, None], best_value.shape)
    for position in range(1, table.shape[1]):
        candidate = by_offset[:, table[:, position]]
        better = candidate > best_value
        best_value = jnp.where(better, candidate, best_value)
        best_offset = jnp.where(better, jnp.asarray(table[:, position], jnp.int32)[None, :, None, None], best_offset)
    # Flat index into the (H, W) map of source + best offset, for every slot.
    rows, cols = window
    source_flat = np.arange(rows.start, rows.stop)[:, None] * width + np.arange(cols.start, cols.stop)[None, :]
    offset_flat = jnp.asarray(offsets[:, 0] * width + offsets[:, 1], jnp.int32)
    flat_index = offset_flat[best_offset] + jnp.asarray(source_flat, jnp.int32)
    path_max = jnp.take_along_axis(edge.reshape(batch, 1, -1), flat_index.reshape(batch, 1, -1), axis=2)
    return 1 - path_max.reshape(best_value.shape)


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
