"""The puzzle module: cut images into an N x N grid of tiles and merge tile maps back.

Owns the tiling layout used by the Puzzle-CAM trainer. Layout is NHWC and **example-major**:
``tile(images, grid)`` turns ``(B, H, W, C)`` into ``(B * grid * grid, H / grid, W / grid, C)``
where rows ``b * grid**2 ... (b + 1) * grid**2 - 1`` hold the tiles of image ``b`` in row-major tile
order (top-left, top-right, ..., bottom-right). ``merge`` is the exact inverse. Both are pure
reshape/transpose operations (no gathers, no loops over tiles), so under data-parallel sharding
every device tiles and merges its own images without cross-device traffic.

Relation to the authors' code (spec §3): they concatenate tiles **piece-major** along the batch
axis, ``[all top-left, all top-right, all bottom-left, all bottom-right]``, i.e. tile ``p`` of image
``b`` sits at row ``p * B + b``; here it sits at row ``b * grid**2 + p``. The two orders are a
permutation of each other (``to_piece_major`` / ``from_piece_major``), and every loss is a mean over
the batch, so the losses are identical. Only per-device BatchNorm statistics of the tiled pass can
differ: under the authors' DataParallel each GPU saw the tiles of one grid position.

The functions accept numpy or jax arrays and return the same kind (they only call array methods), so
the host-side data pipeline can use them too.
"""

from typing import TypeVar

import jax.numpy as jnp
import numpy as np

Array = TypeVar("Array", np.ndarray, jnp.ndarray)


def _check_grid(grid: int) -> None:
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"grid must be a positive integer (tiles per side), got {grid!r}.")


def _check_rank4(array: Array, name: str) -> None:
    if array.ndim != 4:
        raise ValueError(f"{name} must be NHWC with 4 dimensions, got shape {tuple(array.shape)}.")


def tile(images: Array, grid: int) -> Array:
    """Cuts every image into a ``grid x grid`` grid of tiles, example-major.

    Args:
      images: ``(B, H, W, C)`` batch; ``H`` and ``W`` must be divisible by ``grid`` (use
        ``pad_to_multiple`` first for arbitrary sizes).
      grid: number of tiles per side (the authors' ``--num_pieces 4`` is ``grid=2``).

    Returns:
      ``(B * grid * grid, H // grid, W // grid, C)``: the tiles of image 0 first (row-major tile
      order), then those of image 1, and so on.

    Raises:
      ValueError: if ``grid`` is not a positive integer, ``images`` is not rank 4, or ``H``/``W``
        is not divisible by ``grid``.
    """
    _check_grid(grid)
    _check_rank4(images, "images")
    batch, height, width, channels = images.shape
    if height % grid or width % grid:
        raise ValueError(
            f"Image size {height}x{width} is not divisible by grid={grid}; pad it first with "
            f"pad_to_multiple(images, {grid} * output_stride)."
        )
    tile_height, tile_width = height // grid, width // grid
    # (B, row, h, col, w, C) -> (B, row, col, h, w, C): tile index = row * grid + col.
    tiles = images.reshape(batch, grid, tile_height, grid, tile_width, channels)
    tiles = tiles.transpose(0, 1, 3, 2, 4, 5)
    return tiles.reshape(batch * grid * grid, tile_height, tile_width, channels)


def merge(tiles: Array, grid: int) -> Array:
    """Reassembles example-major tiles (or per-tile maps) into whole images; inverse of ``tile``.

    Args:
      tiles: ``(B * grid * grid, h, w, C)`` in the order produced by ``tile``; usually the class
        maps of the tiled forward pass.
      grid: number of tiles per side.

    Returns:
      ``(B, grid * h, grid * w, C)``.

    Raises:
      ValueError: if ``grid`` is not a positive integer, ``tiles`` is not rank 4, or the number
        of tiles is not a multiple of ``grid * grid``.
    """
    _check_grid(grid)
    _check_rank4(tiles, "tiles")
    num_tiles, tile_height, tile_width, channels = tiles.shape
    pieces = grid * grid
    if num_tiles % pieces:
        raise ValueError(f"Number of tiles {num_tiles} is not a multiple of grid*grid={pieces} (grid={grid}).")
    batch = num_tiles // pieces
    images = tiles.reshape(batch, grid, grid, tile_height, tile_width, channels)
    images = images.transpose(0, 1, 3, 2, 4, 5)
    return images.reshape(batch, grid * tile_height, grid * tile_width, channels)


def to_piece_major(tiles: Array, grid: int) -> Array:
    """Reorders example-major tiles into the authors' piece-major batch order.

    Row ``b * grid**2 + p`` (tile ``p`` of image ``b``) moves to row ``p * B + b``. Only needed to
    compare with the authors' code or to reproduce their per-position BatchNorm statistics.

    Args:
      tiles: ``(B * grid * grid, ...)`` example-major tiles.
      grid: number of tiles per side.

    Returns:
      The same tiles in piece-major order.
    """
    return _swap_leading_blocks(tiles, grid, input_piece_major=False)


def from_piece_major(tiles: Array, grid: int) -> Array:
    """Inverse of ``to_piece_major``: the authors' piece-major order back to example-major.

    Args:
      tiles: ``(grid * grid * B, ...)`` piece-major tiles.
      grid: number of tiles per side.

    Returns:
      The same tiles in example-major order (what ``merge`` expects).
    """
    return _swap_leading_blocks(tiles, grid, input_piece_major=True)


def _swap_leading_blocks(tiles: Array, grid: int, *, input_piece_major: bool) -> Array:
    """Views the leading axis as (pieces, B) if ``input_piece_major`` else (B, pieces) and swaps the two blocks."""
    _check_grid(grid)
    pieces = grid * grid
    if tiles.shape[0] % pieces:
        raise ValueError(f"Number of tiles {tiles.shape[0]} is not a multiple of grid*grid={pieces}.")
    batch = tiles.shape[0] // pieces
    rest = tuple(tiles.shape[1:])
    blocks = (pieces, batch) if input_piece_major else (batch, pieces)
    return tiles.reshape(blocks + rest).swapaxes(0, 1).reshape((pieces * batch,) + rest)


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """``(height, width)`` rounded up to multiples of ``multiple``: the size ``pad_to_multiple`` pads to."""
    return height + -height % multiple, width + -width % multiple


def pad_to_multiple(images: Array, multiple: int) -> tuple[Array, tuple[int, int]]:
    """Zero-pads the bottom and right of NHWC images so that H and W are multiples of ``multiple``.

    The puzzle branch needs sides divisible by ``grid * output_stride`` (32 for a 2x2 grid at stride
    16); the authors' code crashes otherwise (issue #18). Zero is the mean colour once images are
    normalised, the same fill the authors use for their random-crop canvas.

    Args:
      images: ``(B, H, W, C)`` normalised images (numpy or jax).
      multiple: the side length must become a multiple of this (e.g. ``grid * output_stride``).

    Returns:
      ``(padded, (H, W))``: the padded batch and the original height and width (to crop results
      back).

    Raises:
      ValueError: if ``multiple`` is not a positive integer or ``images`` is not rank 4.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}.")
    _check_rank4(images, "images")
    height, width = int(images.shape[1]), int(images.shape[2])
    padded_height, padded_width = padded_size(height, width, multiple)
    if (padded_height, padded_width) == (height, width):
        return images, (height, width)
    padding = ((0, 0), (0, padded_height - height), (0, padded_width - width), (0, 0))
    array_module = np if isinstance(images, np.ndarray) else jnp
    return array_module.pad(images, padding), (height, width)
