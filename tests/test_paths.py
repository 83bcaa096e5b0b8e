"""Tests of puzzle_jax.refine.paths against a loop-based transcription of IRN's PathIndex definitions.

The reference geometry here is built from the definition "grid points at distance < 1 from the segment between the
source and the destination" (exact rational arithmetic), not from the module's box-and-line rule; within the
bounding box the two coincide, and no grid point outside the box is closer than 1 to the segment.
"""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puzzle_jax import labels
from puzzle_jax.refine import paths


def _reference_directions(radius):
    """All (dy, dx) with dy² + dx² < r² in the half-plane dy > 0 or (dy == 0 and dx > 0), in the authors' order."""
    horizontal = [(0, dx) for dx in range(1, radius)]
    lower = [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dy * dy + dx * dx < radius**2]
    return horizontal + lower


def _segment_distance_squared(point, end):
    """Exact squared distance from ``point`` to the segment from (0, 0) to ``end``."""
    (py, px), (ey, ex) = point, end
    length_squared = ey * ey + ex * ex
    t = Fraction(py * ey + px * ex, length_squared)
    t = min(max(t, Fraction(0)), Fraction(1))
    return (py - t * ey) ** 2 + (px - t * ex) ** 2


def _reference_path(direction, radius):
    """The grid points closer than 1 to the segment, searched over a box much larger than the path's."""
    return {
        (y, x)
        for y in range(-radius - 2, radius + 3)
        for x in range(-radius - 2, radius + 3)
        if _segment_distance_squared((y, x), direction) < 1
    }


def test_direction_counts_and_order():
    assert len(paths.search_directions(5)) == 34
    for radius in (2, 3, 5, 10):
        disc = sum(
            1 for y in range(-radius, radius + 1) for x in range(-radius, radius + 1) if y * y + x * x < radius**2
        )
        directions = paths.search_directions(radius)
        # Half of the non-zero points of the open disc: each unordered pixel pair counted once.
        assert len(directions) == (disc - 1) // 2
        assert [tuple(d) for d in directions.tolist()] == _reference_directions(radius)
    assert len(paths.search_directions(10)) == 152


@pytest.mark.parametrize("radius", [2, 3, 5, 10])
def test_path_offsets_are_the_points_near_the_segment(radius):
    offsets = paths.path_offsets(radius)
    directions = paths.search_directions(radius)
    assert len(offsets) == len(directions)
    for direction, path in zip(directions.tolist(), offsets):
        points = [tuple(p) for p in path.tolist()]
        assert len(set(points)) == len(points)
        assert set(points) == _reference_path(tuple(direction), radius)
        # Far end first: the destination leads, the source closes, and |y| + |x| never increases.
        assert points[0] == tuple(direction) and points[-1] == (0, 0)
        manhattan = [abs(y) + abs(x) for y, x in points]
        assert manhattan == sorted(manhattan, reverse=True)


def test_source_window_and_small_maps():
    rows, cols = paths.source_window(12, 20, 5)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 8, 4, 16)
    assert paths.source_window(5, 9, 5) == (slice(0, 1), slice(4, 5))
    with pytest.raises(ValueError, match="no source pixel"):
        paths.source_window(4, 9, 5)
    with pytest.raises(ValueError, match="no source pixel"):
        paths.source_window(5, 8, 5)
    with pytest.raises(ValueError, match="radius"):
        paths.search_directions(1)


def _reference_affinity(edge, radius):
    """Loops over images, sources and directions: 1 - max(edge) over the points near the segment."""
    batch, height, width = edge.shape
    margin = radius - 1
    directions = _reference_directions(radius)
    path_points = [sorted(_reference_path(d, radius)) for d in directions]
    out = np.zeros((batch, len(directions), height - margin, width - 2 * margin))
    for b in range(batch):
        for i in range(height - margin):
            for j in range(width - 2 * margin):
                sy, sx = i, j + margin
                for d, points in enumerate(path_points):
                    out[b, d, i, j] = 1 - max(edge[b, sy + y, sx + x] for y, x in points)
    return out


def _reference_pair_labels(label_maps, radius):
    batch, height, width = label_maps.shape
    margin = radius - 1
    directions = _reference_directions(radius)
    shape = (batch, len(directions), height - margin, width - 2 * margin)
    bg, fg, neg = np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape, bool)
    for b in range(batch):
        for i in range(height - margin):
            for j in range(width - 2 * margin):
                source = label_maps[b, i, j + margin]
                for d, (dy, dx) in enumerate(directions):
                    destination = label_maps[b, i + dy, j + margin + dx]
                    if source == 255 or destination == 255:
                        continue
                    bg[b, d, i, j] = source == destination == 0
                    fg[b, d, i, j] = source == destination and source > 0
                    neg[b, d, i, j] = source != destination
    return bg, fg, neg


@pytest.mark.parametrize("radius,height,width", [(5, 11, 17), (5, 5, 9), (3, 7, 6), (10, 14, 23)])
def test_path_max_affinity_matches_loops(radius, height, width):
    edge = np.random.default_rng(radius + height).random((2, height, width))
    expected = _reference_affinity(edge, radius)
    got = paths.path_max_affinity(jnp.asarray(edge, jnp.float32), radius)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-7)


def test_path_max_affinity_keeps_the_dtype_and_is_differentiable():
    radius, height, width = 4, 9, 13
    edge = np.random.default_rng(3).random((2, height, width)).astype(np.float32)
    assert paths.path_max_affinity(jnp.asarray(edge, jnp.bfloat16), radius).dtype == jnp.bfloat16
    # d(sum of affinities)/d(edge) is minus the number of paths on which a pixel holds the maximum (maxima are unique
    # for random edges).
    expected = np.zeros_like(edge)
    margin = radius - 1
    path_points = [_reference_path(d, radius) for d in _reference_directions(radius)]
    for b in range(2):
        for i in range(height - margin):
            for j in range(width - 2 * margin):
                for points in path_points:
                    y, x = max(points, key=lambda p: edge[b, i + p[0], j + margin + p[1]])
                    expected[b, i + y, j + margin + x] -= 1
    gradient = jax.grad(lambda e: paths.path_max_affinity(e, radius).sum())(jnp.asarray(edge))
    np.testing.assert_array_equal(np.asarray(gradient), expected)


@pytest.mark.parametrize("radius,height,width", [(5, 10, 13), (10, 12, 21)])
def test_pair_labels_match_loops(radius, height, width):
    rng = np.random.default_rng(height)
    label_maps = rng.choice(np.array([0, 0, 1, 2, 7, labels.IGNORE_LABEL]), size=(2, height, width))
    expected = _reference_pair_labels(label_maps, radius)
    got = paths.pair_labels(jnp.asarray(label_maps, jnp.int32), radius)
    for got_mask, expected_mask in zip(got, expected):
        assert got_mask.dtype == jnp.bool_
        np.testing.assert_array_equal(np.asarray(got_mask), expected_mask)
    # Each valid pair is exactly one of the three; pairs touching a void pixel are none.
    total = sum(np.asarray(mask, np.int64) for mask in got)
    assert total.max() == 1 and total.sum() < total.size


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"edge must be \(B, H, W\)"):
        paths.path_max_affinity(jnp.zeros((8, 12)), 5)
    with pytest.raises(ValueError, match=r"label_maps must be \(B, H, W\)"):
        paths.pair_labels(jnp.zeros((8, 12), jnp.int32), 5)
