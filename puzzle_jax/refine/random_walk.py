"""The random walk that propagates CAMs inside the boundaries AffinityNet predicts, and its upsampling.

Owns the arithmetic of IRN's ``propagate_to_edge`` as the authors use it (spec §8, steps 2-5). Their construction is
dense: pad the stride-4 edge map with 1.0 by ``radius`` left, right and bottom; take the sparse path affinities
``1 - max(edge along the path)`` on the padded grid (``paths.path_max_affinity``); scatter them into a dense symmetric
``(HW, HW)`` matrix with 1 on the diagonal; crop the padding away; ``A ** beta``; ``T`` = ``A`` divided by its column
sums; square ``T`` ``exp_times`` times; ``rw = x_flat @ T`` with ``x = cams * (1 - edge)``.

Deviation (harmless, same mathematics): we never build the matrix. A column of ``T`` has at most ``2 D + 1`` non-zeros
(``D`` = 34 search directions at radius 5, each pixel pair once per direction and once transposed, plus the
diagonal), so ``x @ T`` is a per-pixel stencil of ``2 D + 1`` weights over shifted copies of ``x``, and
``x @ T^(2^k)`` is that stencil applied ``2^k`` times (``lax.fori_loop``). Memory is linear in pixels instead of
quadratic (2.6 GB for the dense matrix of a 640x640 image's 160x160 grid in float32), and the work is
``2^k (2 D + 1)`` multiply-adds per pixel and class instead of ``k`` dense ``(HW)^3`` products. The two agree to
float32 rounding (tests: against a float64 transcription of the dense construction, ~1e-6 relative in float32); the
order of the multiplications differs (repeated stencil instead of repeated squaring), which changes nothing beyond
rounding, and each step is written as an update ``x + sum w (x_neighbour - x)`` (see ``_walk_step``), which makes it
exactly an average whatever the rounding of the weights.
There is no matmul or convolution, so no backend's reduced matmul precision (TF32 on GPUs, bf16 on TPUs) applies.

Padding with 1.0 makes every affinity to a padded pixel exactly 0 (the destination is on its path), and no path
between two image pixels leaves the image (a path stays inside the bounding box of its ends), so the padding only
removes the pairs that leave the image (we also mask them explicitly, not relying on the padding value). ``beta``
must be positive: with ``beta = 0`` the authors' ``A ** 0`` turns every zero of the dense matrix into 1, a walk over
all pixel pairs that no stencil reproduces (and that nobody wants).

For the same reason a map padded on the right and bottom with edge 1.0 (to a shape bucket, so that one compilation
serves many images) walks exactly as the unpadded map on its image pixels, whatever the CAMs hold in the padding:
a pixel with edge 1 has affinity 0 to every other pixel.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from puzzle_jax.refine import paths


def _stencil_offsets(radius: int) -> list[tuple[int, int]]:
    """The offsets ``q - p`` of the pixels ``q`` a pixel ``p`` reads from: itself, each direction, each reversed."""
    directions = [tuple(d) for d in paths.search_directions(radius).tolist()]
    return [(0, 0)] + directions + [(-dy, -dx) for dy, dx in directions]


def _shift(array: jnp.ndarray, offset_y: int, offset_x: int, margin: int) -> jnp.ndarray:
    """``result[..., p] = array[..., p + offset]`` over the last two axes, zero where ``p + offset`` leaves the map.

    ``array`` is already zero-padded by ``margin >= |offset|`` on both sides of its last two axes.
    """
    height, width = array.shape[-2] - 2 * margin, array.shape[-1] - 2 * margin
    return array[..., margin + offset_y : margin + offset_y + height, margin + offset_x : margin + offset_x + width]


def _pad_spatial(array: jnp.ndarray, margin: int) -> jnp.ndarray:
    return jnp.pad(array, [(0, 0)] * (array.ndim - 2) + [(margin, margin), (margin, margin)])


def walk_weights(edge: jnp.ndarray, *, radius: int = 5, beta: float = 10) -> jnp.ndarray:
    """The per-pixel weights of one step ``x -> x @ T`` of the walk.

    Args:
      edge: ``(B, h, w)`` edge probabilities in ``[0, 1]`` on the stride-4 grid.
      radius: the search radius of the affinities (the authors' inference uses 5).
      beta: the exponent applied to the affinities.

    Returns:
      ``(B, 2 D + 1, h, w)``: ``weights[:, s, p]`` multiplies ``x[p + offset_s]``, for the offsets of
      ``_stencil_offsets(radius)`` (self, directions, reversed directions); zero where that pixel is outside the map.
      The weights of a pixel sum to 1 (a column of ``T``).
    """
    _, height, width = edge.shape
    margin = radius - 1
    # The authors' padding: 1.0 by `radius` left, right and bottom. Image pixel (i, j) is padded pixel (i, j + radius),
    # i.e. slot (i, j + 1) of the source window, whose columns start at radius - 1.
    padded = jnp.pad(edge, [(0, 0), (0, radius), (radius, radius)], constant_values=1.0)
    affinity = paths.path_max_affinity(padded, radius)[:, :, :height, 1 : width + 1]
    directions = paths.search_directions(radius)
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    inside = np.stack([(rows + dy < height) & (cols + dx >= 0) & (cols + dx < width) for dy, dx in directions.tolist()])
    # affinity_to[d, p]: between p and p + d, which is A[p + d, p]; affinity_from[d, p]: between p - d and p.
    affinity_to = jnp.where(inside, affinity**beta, 0)
    padded_to = _pad_spatial(affinity_to, margin)
    affinity_from = jnp.stack(
        [_shift(padded_to[:, index], -dy, -dx, margin) for index, (dy, dx) in enumerate(directions.tolist())], axis=1
    )
    neighbours = jnp.concatenate([jnp.ones_like(affinity_to[:, :1]), affinity_to, affinity_from], axis=1)
    return neighbours / neighbours.sum(axis=1, keepdims=True)


def _walk_step(
    x: jnp.ndarray, neighbour_weights: jnp.ndarray, offsets: list[tuple[int, int]], margin: int
) -> jnp.ndarray:
    """One ``x -> x @ T`` on ``x (B, K, h, w)``, given the weights ``(B, S - 1, h, w)`` of the neighbours.

    Computed as ``x_p + sum_s w_s (x_{p+s} - x_p)``, which equals ``sum_s w_s x_{p+s}`` because a pixel's weights sum
    to 1, but is far more accurate in float32: the self weight is implicitly ``1 - sum(others)``, so every step is
    exactly an average (rounded weights that sum to ``1 + 3e-7`` would otherwise scale the maps by that factor 256
    times), and the increments shrink as the walk mixes. Measured against the float64 dense construction: about 1e-6
    relative instead of about 1e-4.
    """
    padded = _pad_spatial(x, margin)
    change = jnp.zeros_like(x)
    for index, (offset_y, offset_x) in enumerate(offsets[1:]):
        change = change + neighbour_weights[:, index : index + 1] * (_shift(padded, offset_y, offset_x, margin) - x)
    return x + change


@functools.partial(jax.jit, static_argnames=("radius", "beta"))
def propagate_to_edge(
    cams: jnp.ndarray, edge: jnp.ndarray, *, radius: int = 5, beta: float = 10, exp_times: int = 8
) -> jnp.ndarray:
    """Propagates CAMs by a random walk on the edge-derived affinities: the authors' ``x_flat @ T^(2^exp_times)``.

    Args:
      cams: ``(K, h, w)`` class maps on the stride-4 grid (the authors' max-normalised foreground CAMs), or
        ``(B, K, h, w)`` for a batch of same-size maps.
      edge: ``(h, w)`` edge probabilities in ``[0, 1]``, or ``(B, h, w)`` with batched ``cams``.
      radius: the affinity search radius (static; the authors' inference uses 5).
      beta: the affinity exponent, positive (static).
      exp_times: the walk takes ``2 ** exp_times`` steps (the authors square ``T`` ``exp_times`` times). Not static:
        a loop bound, so one compilation serves every value.

    Returns:
      The walked maps, shaped as ``cams``, in the promoted dtype of ``cams`` and ``edge``.

    Raises:
      ValueError: if the shapes do not match or ``beta`` is not positive.
    """
    batched = cams.ndim == 4
    if cams.ndim not in (3, 4) or edge.ndim != cams.ndim - 1 or edge.shape[-2:] != cams.shape[-2:]:
        raise ValueError(
            f"Expected cams (K, h, w) with edge (h, w), or cams (B, K, h, w) with edge (B, h, w); got cams "
            f"{tuple(cams.shape)} and edge {tuple(edge.shape)}."
        )
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta!r}.")
    if batched and edge.shape[0] != cams.shape[0]:
        raise ValueError(f"cams hold {cams.shape[0]} images but edge holds {edge.shape[0]}.")
    if not batched:
        cams, edge = cams[None], edge[None]
    dtype = jnp.result_type(cams, edge)
    cams, edge = cams.astype(dtype), edge.astype(dtype)
    weights = walk_weights(edge, radius=radius, beta=beta)
    offsets = _stencil_offsets(radius)
    step = functools.partial(_walk_step, neighbour_weights=weights[:, 1:], offsets=offsets, margin=radius - 1)
    steps = jnp.left_shift(1, jnp.asarray(exp_times, jnp.int32))
    walked = jax.lax.fori_loop(0, steps, lambda _, x: step(x), cams * (1 - edge[:, None]))
    return walked if batched else walked[0]


def _upsample_axis_by_4(array: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Bilinear x4 along ``axis``, align_corners=False: output ``4 i + k`` samples input ``i + (k + 0.5) / 4 - 0.5``.

    The sample positions are ``i - 3/8, i - 1/8, i + 1/8, i + 3/8``, so each output is a fixed blend of input ``i``
    and a neighbour; edge replication reproduces torch's clamping of positions outside the input.
    """
    size = array.shape[axis]
    padded = jnp.pad(array, [(1, 1) if a == axis % array.ndim else (0, 0) for a in range(array.ndim)], mode="edge")
    previous, current, following = (jax.lax.slice_in_dim(padded, start, start + size, axis=axis) for start in (0, 1, 2))
    phases = [
        0.375 * previous + 0.625 * current,
        0.125 * previous + 0.875 * current,
        0.875 * current + 0.125 * following,
        0.625 * current + 0.375 * following,
    ]
    stacked = jnp.stack(phases, axis=axis % array.ndim + 1)
    shape = list(array.shape)
    shape[axis] = 4 * size
    return stacked.reshape(shape)


def upsample_by_4(maps: jnp.ndarray) -> jnp.ndarray:
    """Bilinear x4 upsampling of the last two axes, align_corners=False (torch's ``F.interpolate`` with
    ``scale_factor=4``): ``(..., h, w) -> (..., 4 h, 4 w)``."""
    return _upsample_axis_by_4(_upsample_axis_by_4(maps, -2), -1)


def upsample_walk(walked: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """The walk's maps at image resolution, normalised by their global maximum (spec §8 step 5).

    Args:
      walked: ``(K, h, w)`` output of ``propagate_to_edge`` on the stride-4 grid.
      height: the image height, at most ``4 h``.
      width: the image width, at most ``4 w``.

    Returns:
      ``(K, height, width)``: bilinear x4 upsampling (align_corners=False, as torch's ``F.interpolate`` with
      ``scale_factor=4``), cropped to the image, divided by the maximum over all classes and pixels. An all-zero (or
      non-positive) map stays zero instead of becoming NaN.

    Raises:
      ValueError: if ``walked`` is not rank 3 or the image does not fit in ``4 h x 4 w``.
    """
    if walked.ndim != 3:
        raise ValueError(f"walked must be (K, h, w), got shape {tuple(walked.shape)}.")
    if not (0 < height <= 4 * walked.shape[1] and 0 < width <= 4 * walked.shape[2]):
        raise ValueError(
            f"A {height}x{width} image does not match a stride-4 grid of {walked.shape[1]}x{walked.shape[2]}."
        )
    upsampled = upsample_by_4(jnp.asarray(walked))[:, :height, :width]
    maximum = upsampled.max()
    return jnp.where(maximum > 0, upsampled / jnp.where(maximum > 0, maximum, 1), 0)
