"""Tests of puzzle_jax.puzzle: tile order, exact inverse, padding, the authors' piece order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from puzzle_jax import puzzle


def _random_images(batch, height, width, channels, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, height, width, channels)).astype(
        np.float32
    )


def _tiles_by_slicing(images, grid):
    """Independent reference: explicit loops over images and tile rows/columns."""
    batch, height, width, _ = images.shape
    tile_height, tile_width = height // grid, width // grid
    tiles = []
    for b in range(batch):
        for row in range(grid):
            for col in range(grid):
                tiles.append(
                    images[
                        b,
                        row * tile_height : (row + 1) * tile_height,
                        col * tile_width : (col + 1) * tile_width,
                    ]
                )
    return np.stack(tiles)


@pytest.mark.parametrize("grid", [1, 2, 3, 4])
@pytest.mark.parametrize("height,width", [(12, 24), (36, 12)])
def test_tile_matches_slicing_loop_and_merge_inverts(grid, height, width):
    images = _random_images(3, height, width, 5, seed=grid)
    tiles = puzzle.tile(jnp.asarray(images), grid)
    np.testing.assert_array_equal(np.asarray(tiles), _tiles_by_slicing(images, grid))
    np.testing.assert_array_equal(np.asarray(puzzle.merge(tiles, grid)), images)


@pytest.mark.parametrize("grid", [1, 2, 3, 4])
def test_merge_tile_round_trip_odd_sizes_numpy_and_jit(grid):
    # Odd tile sizes (7 x 5 per tile) and an odd batch; numpy in -> numpy out, also under jit.
    images = _random_images(3, 7 * grid, 5 * grid, 3, seed=10 + grid)
    tiles = puzzle.tile(images, grid)
    assert isinstance(tiles, np.ndarray)
    assert tiles.shape == (3 * grid * grid, 7, 5, 3)
    np.testing.assert_array_equal(puzzle.merge(tiles, grid), images)
    round_trip = jax.jit(lambda x: puzzle.merge(puzzle.tile(x, grid), grid))(images)
    np.testing.assert_array_equal(np.asarray(round_trip), images)


def test_merge_of_tile_maps_places_each_tile_in_its_cell():
    # Merge arbitrary per-tile maps and compare with a loop that writes each tile to its cell.
    grid, batch, tile_height, tile_width, channels = 3, 2, 4, 2, 6
    tiles = _random_images(batch * grid * grid, tile_height, tile_width, channels, seed=3)
    expected = np.zeros((batch, grid * tile_height, grid * tile_width, channels), np.float32)
    for index, tile_map in enumerate(tiles):
        b, position = divmod(index, grid * grid)
        row, col = divmod(position, grid)
        rows = slice(row * tile_height, (row + 1) * tile_height)
        cols = slice(col * tile_width, (col + 1) * tile_width)
        expected[b, rows, cols] = tile_map
    np.testing.assert_array_equal(np.asarray(puzzle.merge(jnp.asarray(tiles), grid)), expected)


@pytest.mark.parametrize("grid", [2, 4])
def test_gap_of_merged_maps_is_mean_of_tile_gaps(grid):
    # p_class_loss relies on this: GAP(merged) == mean over an image's tiles of GAP(tile).
    batch, channels = 3, 20
    tile_maps = _random_images(batch * grid * grid, 4, 4, channels, seed=grid)
    merged_gap = np.asarray(puzzle.merge(jnp.asarray(tile_maps), grid)).mean(axis=(1, 2))
    tile_gap = tile_maps.mean(axis=(1, 2)).reshape(batch, grid * grid, channels).mean(axis=1)
    np.testing.assert_allclose(merged_gap, tile_gap, rtol=1e-5, atol=1e-6)


def _authors_tile_features(images_nchw, num_pieces):
    """Torch transcription of spec §3 tile_features: 2x2 pieces concatenated piece-major."""
    _, _, height, width = images_nchw.size()
    half_height, half_width = height // 2, width // 2
    assert num_pieces == 4
    pieces = [
        images_nchw[:, :, :half_height, :half_width],
        images_nchw[:, :, :half_height, half_width:],
        images_nchw[:, :, half_height:, :half_width],
        images_nchw[:, :, half_height:, half_width:],
    ]
    return torch.cat(pieces, dim=0)


def _authors_merge_features(tiles_nchw, num_pieces, batch_size):
    """Torch transcription of spec §3 merge_features: chunks of batch_size, (0,1) / (2,3) rows."""
    assert num_pieces == 4
    chunks = list(torch.split(tiles_nchw, batch_size))
    top = torch.cat(chunks[:2], dim=3)
    bottom = torch.cat(chunks[2:], dim=3)
    return torch.cat([top, bottom], dim=2)


def test_relation_to_authors_piece_major_order():
    batch = 3
    images = _random_images(batch, 8, 12, 4, seed=7)
    authors_tiles = _authors_tile_features(torch.from_numpy(images).permute(0, 3, 1, 2), 4)
    authors_tiles_nhwc = authors_tiles.permute(0, 2, 3, 1).numpy()
    ours = puzzle.tile(images, 2)
    # Tile p of image b: our row b*4+p, their row p*B+b.
    for b in range(batch):
        for p in range(4):
            np.testing.assert_array_equal(ours[b * 4 + p], authors_tiles_nhwc[p * batch + b])
    np.testing.assert_array_equal(puzzle.to_piece_major(ours, 2), authors_tiles_nhwc)
    np.testing.assert_array_equal(puzzle.from_piece_major(authors_tiles_nhwc, 2), ours)
    # Their merge of their order equals our merge of ours.
    authors_merged = _authors_merge_features(authors_tiles, 4, batch).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(puzzle.merge(ours, 2), authors_merged)


def test_tile_rejects_indivisible_size_and_bad_grid():
    images = np.zeros((1, 10, 12, 3), np.float32)
    with pytest.raises(ValueError, match="10x12.*grid=4"):
        puzzle.tile(images, 4)
    with pytest.raises(ValueError, match="grid"):
        puzzle.tile(images, 0)
    with pytest.raises(ValueError, match="multiple of grid"):
        puzzle.merge(np.zeros((6, 2, 2, 1)), 2)


@pytest.mark.parametrize("use_jax", [False, True])
def test_pad_to_multiple_pads_bottom_right_with_zeros(use_jax):
    images = _random_images(2, 17, 32, 3, seed=1) + 5.0
    array = jnp.asarray(images) if use_jax else images
    padded, original_size = puzzle.pad_to_multiple(array, 32)
    assert original_size == (17, 32)
    assert padded.shape == (2, 32, 32, 3)
    padded = np.asarray(padded)
    np.testing.assert_array_equal(padded[:, :17, :32], images)
    assert np.all(padded[:, 17:] == 0)
    # Padded images can then be tiled with any grid dividing the multiple.
    assert puzzle.tile(padded, 2).shape == (8, 16, 16, 3)


def test_pad_to_multiple_is_identity_when_already_divisible():
    images = _random_images(1, 64, 32, 3)
    padded, original_size = puzzle.pad_to_multiple(images, 32)
    assert original_size == (64, 32)
    np.testing.assert_array_equal(padded, images)
    with pytest.raises(ValueError, match="multiple"):
        puzzle.pad_to_multiple(images, 0)
