"""Tests of puzzle_jax.refine.random_walk against a float64 numpy transcription of the authors' dense construction.

The reference builds what IRN's ``propagate_to_edge`` builds: the edge padded with 1.0, the path affinities of every
(source, destination) pair of the padded grid (geometry from the segment-distance definition in ``test_paths``)
scattered into a dense matrix with its transpose and 1 on the diagonal (summed, as torch's sparse-to-dense sums
duplicates), the padding cropped, ``A ** beta``, column normalisation, ``exp_times`` squarings and ``x @ T``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_paths import reference_directions, reference_path

from puzzle_jax.refine import random_walk


def dense_walk(cams, edge, radius=5, beta=10, exp_times=8):
    """The authors' dense random walk in float64 numpy: ``(K, h, w), (h, w) -> (K, h, w)``."""
    cams, edge = np.asarray(cams, np.float64), np.asarray(edge, np.float64)
    height, width = edge.shape
    padded_height, padded_width = height + radius, width + 2 * radius
    padded = np.pad(edge, ((0, radius), (radius, radius)), constant_values=1.0)
    vertices = padded_height * padded_width
    affinity = np.zeros((vertices, vertices))
    affinity[np.arange(vertices), np.arange(vertices)] += 1
    margin = radius - 1
    directions = reference_directions(radius)
    path_points = [sorted(reference_path(d, radius)) for d in directions]
    for i in range(padded_height - margin):
        for j in range(margin, padded_width - margin):
            for (dy, dx), points in zip(directions, path_points):
                value = 1 - max(padded[i + y, j + x] for y, x in points)
                source, destination = i * padded_width + j, (i + dy) * padded_width + j + dx
                affinity[source, destination] += value
                affinity[destination, source] += value
    affinity = affinity.reshape(padded_height, padded_width, padded_height, padded_width)
    affinity = affinity[:height, radius : radius + width, :height, radius : radius + width]
    affinity = affinity.reshape(height * width, height * width) ** beta
    transition = affinity / affinity.sum(axis=0, keepdims=True)
    for _ in range(exp_times):
        transition = transition @ transition
    x = (cams * (1 - edge)).reshape(len(cams), -1)
    return (x @ transition).reshape(cams.shape)


def _relative_error(got, expected):
    return np.abs(np.asarray(got, np.float64) - expected).max() / max(np.abs(expected).max(), 1e-30)


def _random_inputs(classes, height, width, seed):
    rng = np.random.default_rng(seed)
    cams = rng.random((classes, height, width)).astype(np.float32)
    # Edges near 0 inside regions and near 1 on a few boundaries, so that the walk is far from uniform.
    edge = (rng.random((height, width)) ** 3).astype(np.float32)
    return cams, edge


@pytest.mark.parametrize("classes,height,width", [(1, 5, 7), (2, 12, 9), (3, 16, 16), (2, 9, 20)])
def test_float32_walk_matches_the_dense_float64_construction(classes, height, width):
    cams, edge = _random_inputs(classes, height, width, seed=height * width)
    expected = dense_walk(cams, edge)
    got = random_walk.propagate_to_edge(jnp.asarray(cams), jnp.asarray(edge))
    assert got.shape == cams.shape and got.dtype == jnp.float32
    assert _relative_error(got, expected) <= 1e-5


@pytest.mark.parametrize("exp_times", range(9))
def test_every_walk_length_matches_the_dense_squarings(exp_times):
    cams, edge = _random_inputs(2, 5, 7, seed=exp_times)
    expected = dense_walk(cams, edge, exp_times=exp_times)
    got = random_walk.propagate_to_edge(jnp.asarray(cams), jnp.asarray(edge), exp_times=exp_times)
    assert _relative_error(got, expected) <= 1e-5


@pytest.mark.parametrize("radius,beta,exp_times", [(3, 2, 3), (4, 1, 2), (2, 30, 6)])
def test_other_radii_and_exponents(radius, beta, exp_times):
    cams, edge = _random_inputs(2, 8, 11, seed=radius)
    expected = dense_walk(cams, edge, radius=radius, beta=beta, exp_times=exp_times)
    got = random_walk.propagate_to_edge(
        jnp.asarray(cams), jnp.asarray(edge), radius=radius, beta=beta, exp_times=exp_times
    )
    assert _relative_error(got, expected) <= 1e-5


def test_float64_walk_matches_to_rounding():
    cams, edge = _random_inputs(2, 12, 9, seed=7)
    expected = dense_walk(cams, edge)
    with jax.enable_x64(True):
        got = random_walk.propagate_to_edge(jnp.asarray(cams, jnp.float64), jnp.asarray(edge, jnp.float64))
        assert got.dtype == jnp.float64
        error = _relative_error(got, expected)
    assert error <= 1e-12


@pytest.mark.parametrize("height,width", [(1, 7), (6, 1), (1, 1)])
def test_one_pixel_wide_maps(height, width):
    cams, edge = _random_inputs(2, height, width, seed=height + 10 * width)
    expected = dense_walk(cams, edge)
    got = random_walk.propagate_to_edge(jnp.asarray(cams), jnp.asarray(edge))
    assert _relative_error(got, expected) <= 1e-5


def test_flat_edges():
    cams, _ = _random_inputs(2, 6, 8, seed=1)
    # No boundary anywhere: every pair within the radius has affinity 1.
    zero_edge = np.zeros((6, 8), np.float32)
    got = random_walk.propagate_to_edge(jnp.asarray(cams), jnp.asarray(zero_edge))
    assert _relative_error(got, dense_walk(cams, zero_edge)) <= 1e-4
    # Boundaries everywhere: T is the identity and x = cams * 0.
    one_edge = np.ones((6, 8), np.float32)
    got = random_walk.propagate_to_edge(jnp.asarray(cams), jnp.asarray(one_edge))
    np.testing.assert_array_equal(np.asarray(got), np.zeros_like(cams))
    # T is the identity when the affinities vanish; the walk then only masks the maps by (1 - edge).
    almost_one = np.full((6, 8), 0.999, np.float32)
    got = random_walk.propagate_to_edge(jnp.asarray(cams), jnp.asarray(almost_one), beta=1000)
    np.testing.assert_allclose(np.asarray(got), cams * (1 - almost_one), rtol=1e-5)


def test_batched_walk_equals_one_image_at_a_time():
    inputs = [_random_inputs(3, 10, 13, seed=seed) for seed in range(3)]
    cams = jnp.asarray(np.stack([c for c, _ in inputs]))
    edge = jnp.asarray(np.stack([e for _, e in inputs]))
    batched = random_walk.propagate_to_edge(cams, edge, exp_times=5)
    for index in range(3):
        single = random_walk.propagate_to_edge(cams[index], edge[index], exp_times=5)
        np.testing.assert_allclose(np.asarray(batched[index]), np.asarray(single), rtol=1e-6, atol=0)


def test_padding_to_a_bucket_with_edge_one_changes_nothing():
    # Pixels with edge 1 have affinity 0 to everything, and paths between image pixels stay in the image, so a map
    # padded on the right and bottom with edge 1 (and any CAM value) walks exactly as the unpadded map.
    cams, edge = _random_inputs(2, 9, 11, seed=5)
    padded_cams = np.pad(cams, ((0, 0), (0, 3), (0, 5)), constant_values=0.7)
    padded_edge = np.pad(edge, ((0, 3), (0, 5)), constant_values=1.0)
    walked = random_walk.propagate_to_edge(jnp.asarray(padded_cams), jnp.asarray(padded_edge))
    assert _relative_error(walked[:, :9, :11], dense_walk(cams, edge)) <= 1e-5


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="Expected cams"):
        random_walk.propagate_to_edge(jnp.zeros((2, 5, 7)), jnp.zeros((5, 6)))
    with pytest.raises(ValueError, match="Expected cams"):
        random_walk.propagate_to_edge(jnp.zeros((5, 7)), jnp.zeros((5, 7)))
    with pytest.raises(ValueError, match="holds 1"):
        random_walk.propagate_to_edge(jnp.zeros((2, 1, 5, 7)), jnp.zeros((1, 5, 7)))
    with pytest.raises(ValueError, match="beta must be positive"):
        random_walk.propagate_to_edge(jnp.zeros((2, 5, 7)), jnp.zeros((5, 7)), beta=0)
    with pytest.raises(ValueError, match="does not match a stride-4 grid"):
        random_walk.upsample_walk(jnp.ones((2, 5, 7)), 21, 28)


def test_memory_is_a_small_fraction_of_the_dense_matrix():
    grid = 160  # a 640x640 image at stride 4
    cams = jax.ShapeDtypeStruct((2, grid, grid), jnp.float32)
    edge = jax.ShapeDtypeStruct((grid, grid), jnp.float32)
    stats = random_walk.propagate_to_edge.lower(cams, edge).compile().memory_analysis()
    peak = (
        stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    )
    dense_matrix = (grid * grid) ** 2 * 4
    assert peak < 0.01 * dense_matrix, (peak, dense_matrix)


@pytest.mark.parametrize("height,width", [(20, 28), (18, 25), (17, 26), (1, 3)])
def test_upsample_matches_torch_interpolate(height, width):
    grid_height, grid_width = -(-height // 4), -(-width // 4)
    walked = np.random.default_rng(height).random((3, grid_height, grid_width)).astype(np.float32)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(walked.astype(np.float64))[:, None], scale_factor=4, mode="bilinear", align_corners=False
    )[:, 0, :height, :width].numpy()
    reference = reference / reference.max()
    got = random_walk.upsample_walk(jnp.asarray(walked), height, width)
    assert got.shape == (3, height, width)
    np.testing.assert_allclose(np.asarray(got), reference, rtol=0, atol=1e-6)
    assert abs(float(got.max()) - 1) <= 1e-6


def test_upsample_of_an_all_zero_walk_stays_zero():
    got = random_walk.upsample_walk(jnp.zeros((2, 4, 5)), 15, 20)
    assert got.shape == (2, 15, 20)
    np.testing.assert_array_equal(np.asarray(got), 0)
