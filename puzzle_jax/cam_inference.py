"""Multi-scale + flip CAMs of one image from an exported classifier (spec §5).

For each scale the image is resized on the host (PIL bicubic, as the authors), batched as uint8 with its horizontal
flip and padded up to a multiple of ``pad_multiple`` so that XLA compiles once per size bucket; the forward call
normalises it on the device (``transforms.normalize_crops``: the host's float32 values bit for bit, zero, the mean
colour, in the padding). The class maps of the valid region go through ReLU, the flipped map is flipped back and
added, and the sum over scales is accumulated at two resolutions with bilinear (align_corners=False) resizing: the
strided map ``(ceil(H/4), ceil(W/4))`` for the random walk and the full-resolution map for evaluation (resized to
the next multiples of 16, then cropped to ``(H, W)``, as the authors do). Only the image's ground-truth classes are
kept, each divided by its own spatial maximum (+1e-5).

The host work is what limited inference on a GPU (BENCHMARKS.md), so it resizes the next images on a pool of
threads (PIL releases the GIL) while the main thread batches and accumulates, writes each scaled uint8 input and its
flip straight into its bucket's batch (reused from call to call: the boxes, not the stale pixels, say what is
padding), leaves the normalisation to the device (a quarter of the bytes to copy and transfer), keeps one forward
call in flight (the next call is dispatched before the previous call's maps are fetched and accumulated, so the
device does not wait for the host in between), and flips, resizes and sums only the ground-truth classes' maps
(resizing is per channel, so this changes no value). The results do not depend on the number of threads.
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from puzzle_jax import puzzle, sharding
from puzzle_jax.data import transforms

# Added to each class's maximum before dividing, as the authors do, so an all-zero map stays zero.
NORMALISATION_EPSILON = 1e-5


# The network call of inference: (uint8 images (N, H, W, 3), int32 boxes (N, 4)) -> ReLU'd class maps (N, h, w, C),
# as any array ``np.asarray`` accepts (a jax.Array still being computed, from ``create_forward``). The inputs must
# not change until ``np.asarray`` of the result has returned.
Forward = Callable[[np.ndarray, np.ndarray], Any]


def create_forward(model: nnx.Module, mesh: jax.sharding.Mesh | None = None) -> Forward:
    """Returns ``(images, boxes) -> ReLU'd class maps (N, h, w, C)`` (a ``jax.Array``), jitted once per input shape.

    ``images`` are uint8 ``(N, H, W, 3)``, normalised on the device with zeros outside each image's box ``(top, left,
    height, width)`` (``transforms.normalize_crops``). With a mesh, the batch is split over its ``'data'`` axis (N
    must then be a multiple of the device count) and the weights are replicated.
    """
    model.eval()
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = sharding.replicate(state, mesh)

    @jax.jit
    def forward(state, images, boxes):
        _, class_maps = nnx.merge(graphdef, state)(transforms.normalize_crops(images, boxes))
        return jax.nn.relu(class_maps.astype(jnp.float32))

    def run(images: np.ndarray, boxes: np.ndarray) -> jax.Array:
        if images.dtype != np.uint8:
            raise ValueError(f"create_forward takes uint8 images (normalised on the device); got {images.dtype}.")
        arrays = (images, np.asarray(boxes, np.int32))
        placed = jax.device_put(arrays, sharding.data_sharded(mesh)) if mesh is not None else arrays
        # Returned while the device may still be computing (``np.asarray`` waits for it).
        return forward(state, *placed)

    return run


def _resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear, half-pixel centres (PyTorch align_corners=False), no antialiasing; ``maps`` is (h, w, C)."""
    if maps.shape[:2] == (height, width):
        return maps
    channels = maps.shape[-1]
    if channels == 0:
        return np.zeros((height, width, 0), maps.dtype)
    # OpenCV handles at most 512 channels per call.
    pieces = [
        cv2.resize(maps[..., start : start + 512], (width, height), interpolation=cv2.INTER_LINEAR)
        for start in range(0, channels, 512)
    ]
    pieces = [piece[..., None] if piece.ndim == 2 else piece for piece in pieces]
    return np.concatenate(pieces, axis=-1)


def _scaled_input(image: np.ndarray, scale: float) -> np.ndarray:
    """The image resized by ``scale`` (PIL bicubic): uint8 ``(round(H*s), round(W*s), 3)``."""
    height, width = round(image.shape[0] * scale), round(image.shape[1] * scale)
    return transforms.resize_image(image, height, width)


def _prefetched(function: Callable, items: Iterable, threads: int) -> Iterator[tuple]:
    """Yields ``(item, function(item))`` in order, computing up to ``2 * threads`` items ahead on a thread pool."""
    if threads <= 1:
        for item in items:
            yield item, function(item)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="cam-inputs") as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append((item, pool.submit(function, item)))
            if len(pending) >= 2 * threads:
                ready_item, ready = pending.popleft()
                yield ready_item, ready.result()
        while pending:
            ready_item, ready = pending.popleft()
            yield ready_item, ready.result()


def default_host_threads() -> int:
    """Threads that prepare inference inputs when none are asked for: the CPU cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


class _ImageAccumulator:
    """Sums one image's flip-merged maps of its ground-truth classes over scales, at both resolutions."""

    def __init__(self, image: np.ndarray, labels: np.ndarray, pending: int):
        self.height, self.width = image.shape[:2]
        self.class_ids = np.flatnonzero(np.asarray(labels) > 0)
        self.pending = pending
        self.strided_sum = 0.0
        self.full_sum = 0.0

    def add(self, maps: np.ndarray, scaled_size: tuple[int, int], flip: bool, output_stride: int) -> None:
        valid_height = math.ceil(scaled_size[0] / output_stride)
        valid_width = math.ceil(scaled_size[1] / output_stride)
        maps = maps[:, :valid_height, :valid_width, self.class_ids]
        summed = maps[0] + maps[1][:, ::-1] if flip else maps[0]
        self.strided_sum = self.strided_sum + _resize_maps(
            summed, math.ceil(self.height / 4), math.ceil(self.width / 4)
        )
        # The authors upsample to the next multiple of 16 and crop, rather than resizing to (H, W) directly.
        upsampled = _resize_maps(summed, 16 * math.ceil(self.height / 16), 16 * math.ceil(self.width / 16))
        self.full_sum = self.full_sum + upsampled[: self.height, : self.width]
        self.pending -= 1

    def result(self) -> dict[str, np.ndarray]:
        return {
            "keys": np.concatenate([[0], self.class_ids + 1]).astype(np.int64),
            "cam": _normalise(self.strided_sum),
            "hr_cam": _normalise(self.full_sum),
        }


def compute_cams(
    forward: Forward,
    image: np.ndarray,
    labels: np.ndarray,
    *,
    scales: Sequence[float],
    flip: bool,
    pad_multiple: int,
    output_stride: int,
) -> dict[str, np.ndarray]:
    """Computes the ``.npz`` payload of one image, one forward call per scale.

    Args:
      forward: from ``create_forward``.
      image: uint8 RGB ``(H, W, 3)``.
      labels: multi-hot ``(C,)`` image-level labels; the maps of these classes are kept.
      scales: input scales (the authors: 0.5, 1.0, 1.5, 2.0).
      flip: also run the horizontally flipped image and add its flipped-back maps.
      pad_multiple: inputs are zero-padded (after normalisation) up to a multiple of this.
      output_stride: the classifier's output stride (to find the valid region of its maps).

    Returns:
      ``keys`` int64 ``(K + 1,)`` = [0, c1 + 1, ...] (background first, class ids 1-based), ``cam`` float32
      ``(K, ceil(H/4), ceil(W/4))`` and ``hr_cam`` float32 ``(K, H, W)``, both max-normalised per class.
    """
    ((_, payload),) = iterate_cams(
        forward,
        [("", image, labels)],
        scales=scales,
        flip=flip,
        pad_multiple=pad_multiple,
        output_stride=output_stride,
        images_per_call=1,
        host_threads=1,  # one image: nothing to prepare ahead, so no thread pool per call
    )
    return payload


def iterate_cams(
    forward: Forward,
    records: Iterable[tuple[str, np.ndarray, np.ndarray]],
    *,
    scales: Sequence[float],
    flip: bool,
    pad_multiple: int,
    output_stride: int,
    images_per_call: int,
    batch_multiple: int = 1,
    host_threads: int = 0,
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """``compute_cams`` for a stream of images, batching inputs of the same padded size across images.

    Each (image, scale) input waits in the queue of its size bucket; a full queue of ``images_per_call`` inputs (with
    their flips) runs as one forward call. Calls always have the same batch size (unused slots have empty boxes, so
    they are all zeros), so XLA compiles once per bucket. An image's payload is yielded once all its scales are done.

    Args:
      forward: from ``create_forward`` (with a mesh, to spread each call over the devices).
      records: ``(id, uint8 image, multi-hot labels)`` triples.
      scales, flip, pad_multiple, output_stride: as in ``compute_cams``.
      images_per_call: inputs (images at one scale) per forward call.
      batch_multiple: the call's batch size is rounded up to a multiple of this (the number of devices).
      host_threads: threads that resize the next images' inputs; 0 = ``default_host_threads()``.

    Yields:
      ``(id, payload)`` with the payload of ``compute_cams``, in completion order.
    """
    multiple = max(pad_multiple, output_stride)
    per_input = 2 if flip else 1
    batch_size = -(-images_per_call * per_input // batch_multiple) * batch_multiple
    # Per size bucket: the uint8 batch being filled and the box of each input in it ((0, 0, height, width); empty for
    # unused slots: whatever else the reused batch holds becomes zeros on the device), the (image id, scaled size)
    # of each input, and a spent batch and boxes to fill again (cheaper than faulting in fresh pages).
    batches: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    entries: dict[tuple[int, int], list[tuple[str, tuple[int, int]]]] = {}
    spent: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    accumulators: dict[str, _ImageAccumulator] = {}

    # One call in flight: a full batch is dispatched (asynchronously on an accelerator) before the previous call's
    # maps are fetched and accumulated, so the device computes while the host accumulates and fills the next batch.
    in_flight: list[tuple] = []

    def dispatch(bucket) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        images, boxes = batches.pop(bucket)
        in_flight.append((bucket, images, boxes, entries.pop(bucket), forward(images, boxes)))
        if len(in_flight) > 1:
            yield from collect(in_flight.pop(0))

    def collect(call) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        bucket, images, boxes, call_entries, pending_maps = call
        maps = np.asarray(pending_maps)
        # Only now, with the call's outputs fetched, may its input buffers be filled again.
        spent[bucket] = (images, boxes)
        for position, (image_id, scaled_size) in enumerate(call_entries):
            accumulator = accumulators[image_id]
            accumulator.add(maps[position * per_input : (position + 1) * per_input], scaled_size, flip, output_stride)
            if accumulator.pending == 0:
                yield image_id, accumulators.pop(image_id).result()

    def scaled_inputs(record):
        return [_scaled_input(record[1], scale) for scale in scales]

    threads = host_threads or default_host_threads()
    for (image_id, image, labels), inputs in _prefetched(scaled_inputs, records, threads):
        if image_id in accumulators:
            raise ValueError(f"Image id {image_id!r} appears twice in the inference stream.")
        accumulators[image_id] = _ImageAccumulator(image, labels, pending=len(scales))
        for scaled in inputs:
            height, width = scaled.shape[:2]
            bucket = puzzle.padded_size(height, width, multiple)
            if bucket not in batches:
                if bucket in spent:
                    batches[bucket] = spent.pop(bucket)
                    batches[bucket][1].fill(0)
                else:
                    batches[bucket] = (
                        np.zeros((batch_size, *bucket, 3), np.uint8),
                        np.zeros((batch_size, 4), np.int32),
                    )
                entries[bucket] = []
            images, boxes = batches[bucket]
            slot = len(entries[bucket]) * per_input
            images[slot, :height, :width] = scaled
            boxes[slot] = (0, 0, height, width)
            if flip:
                images[slot + 1, :height, :width] = scaled[:, ::-1]
                boxes[slot + 1] = (0, 0, height, width)
            entries[bucket].append((image_id, (height, width)))
            if len(entries[bucket]) == images_per_call:
                yield from dispatch(bucket)
    for bucket in list(batches):
        yield from dispatch(bucket)
    while in_flight:
        yield from collect(in_flight.pop(0))


def _normalise(maps: np.ndarray) -> np.ndarray:
    """(h, w, K) -> (K, h, w), each map divided by its own maximum + epsilon."""
    maps = np.moveaxis(np.asarray(maps, np.float32), -1, 0)
    maxima = maps.reshape(maps.shape[0], -1).max(axis=1) if maps.size else np.zeros(0, np.float32)
    return maps / (maxima[:, None, None] + NORMALISATION_EPSILON)
