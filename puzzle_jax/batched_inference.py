"""The batched-inference engine: many images, each as several inputs (scales, flips), through one network call
per batch of same-sized inputs, each image's outputs folded into a per-image accumulator.

What any multi-input inference over a split needs, independent of what the outputs mean (CAMs, the random walk's
edge maps, DeepLab's multi-scale logits):

* **size buckets**: inputs are zero-padded up to a multiple of ``pad_multiple``, so XLA compiles once per bucket, not
  once per image, and inputs of one bucket are batched across images; every call of a bucket has the same batch
  size (unused slots have empty boxes, so the device sees zeros there), split over the devices of a mesh;
* **uint8 inputs with boxes**: each input travels as uint8 with the box of its pixels, normalised on the device
  (``transforms.normalize_crops``): a quarter of the bytes to copy and transfer; a bucket's batch is reused from
  call to call (the boxes, not the stale pixels, say what is padding), which is cheaper than faulting in new pages;
* **host work ahead of the device**: ``prepare`` (resizing, flipping) runs for the next images on a thread pool
  (PIL and OpenCV release the GIL), and **one call stays in flight**: the next call is dispatched before the
  previous call's outputs are fetched and accumulated, so the device does not wait for the host in between;
* **a memory budget**: a call holds at most ``max_pixels_per_call`` padded input pixels (slots x bucket height x
  width), so the calls of a large bucket carry fewer inputs than ``images_per_call`` and a huge image runs alone
  rather than in a batch of huge slots (what exhausted the host's memory and aborted the process). An input over the
  budget even alone is not tiled (tiles would change what the network sees at their borders, so the result would
  differ from the untiled one): it fails with ``InputOverBudgetError``, naming the image, its input size and the
  config field to raise, before anything is allocated for it;
* **named failures**: an exception raised while preparing, running or accumulating an image carries a note naming
  the image id(s), so a failure in a stage of thousands of images says which one.

An image's result is yielded once all its inputs are accumulated. Results do not depend on the number of threads; the
budget changes only which inputs share a call, so an input's outputs are the same, and an accumulator that sums its
inputs may add them in another order (float rounding).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import cv2
import jax
import numpy as np
from flax import nnx

from puzzle_jax import puzzle, sharding
from puzzle_jax.data import transforms

# The network call: (uint8 images (N, H, W, 3), int32 boxes (N, 4)) -> outputs (N, ...), as any array
# ``np.asarray`` accepts (a jax.Array still being computed). The inputs must not change until ``np.asarray`` of
# the result has returned.
Forward = Callable[[np.ndarray, np.ndarray], Any]


class Accumulator(Protocol):
    """Folds one image's outputs together, input by input."""

    def add(self, outputs: np.ndarray, input_size: tuple[int, int]) -> None:
        """Takes the outputs of one input's group (``(group_size, ...)``, padded like the input) and the input's
        unpadded ``(height, width)``."""

    def result(self) -> Any:
        """The image's result, once every input was added."""


class InputOverBudgetError(ValueError):
    """One input of an image holds more padded pixels than a call may (``max_pixels_per_call``), even alone."""


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The size of an image resized by ``scale``: each side ``round(side * scale)``, at least 1.

    A side that would round to 0 (an image 1 pixel high at scale 0.5) is kept at 1 pixel, so every input has pixels;
    the accumulators resize their outputs back to the image's own size, so the result still has the image's size.
    """
    return max(1, round(height * scale)), max(1, round(width * scale))


def inputs_per_call(bucket: tuple[int, int], *, group_size: int, images_per_call: int, max_pixels_per_call: int) -> int:
    """Inputs (groups) per call of a size bucket: ``images_per_call``, fewer where that many would hold more than
    ``max_pixels_per_call`` padded pixels (0 = no budget), at least 1."""
    if max_pixels_per_call <= 0:
        return images_per_call
    pixels_per_input = group_size * bucket[0] * bucket[1]
    return max(1, min(images_per_call, max_pixels_per_call // pixels_per_input))


def _note_images(error: BaseException, image_ids: Sequence[str], what: str) -> None:
    """Adds a note naming the images to an exception on its way out (once per exception)."""
    if not getattr(error, "_puzzle_images_noted", False):
        names = ", ".join(repr(image_id) for image_id in image_ids[:8]) + (" ..." if len(image_ids) > 8 else "")
        error.add_note(f"(while {what} image(s) {names})")
        error._puzzle_images_noted = True


def create_forward(
    model: nnx.Module, apply: Callable[[nnx.Module, jax.Array], jax.Array], mesh: jax.sharding.Mesh | None = None
) -> Forward:
    """Returns the jitted network call ``(images, boxes) -> apply(model, normalised images)`` of an eval-mode model.

    ``images`` are uint8 ``(N, H, W, 3)``, normalised on the device with zeros outside each image's box ``(top, left,
    height, width)`` (``transforms.normalize_crops``). With a mesh, the batch is split over its ``'data'`` axis (N
    must then be a multiple of the device count) and the weights are replicated. Compiled once per input shape; the
    result is returned while the device may still be computing (``np.asarray`` waits for it).
    """
    model.eval()
    graphdef, state = nnx.split(model)
    # On the devices once (a loaded model's weights are host arrays), not copied at every call.
    state = sharding.replicate(state, mesh) if mesh is not None else jax.device_put(state)

    @jax.jit
    def forward(state, images, boxes):
        return apply(nnx.merge(graphdef, state), transforms.normalize_crops(images, boxes))

    def run(images: np.ndarray, boxes: np.ndarray) -> jax.Array:
        if images.dtype != np.uint8:
            raise ValueError(f"Inference takes uint8 images (normalised on the device); got {images.dtype}.")
        arrays = (images, np.asarray(boxes, np.int32))
        placed = jax.device_put(arrays, sharding.data_sharded(mesh)) if mesh is not None else arrays
        return forward(state, *placed)

    return run


def scaled_input(image: np.ndarray, scale: float) -> np.ndarray:
    """The image resized by ``scale`` (PIL bicubic, as the authors): uint8 ``(round(H*s), round(W*s), 3)``, each side
    at least 1 (``scaled_size``)."""
    height, width = scaled_size(image.shape[0], image.shape[1], scale)
    return transforms.resize_image(image, height, width)


def scaled_inputs(image: np.ndarray, scales: Sequence[float], flip: bool) -> list[tuple[np.ndarray, ...]]:
    """The multi-scale inputs of an image (``iterate_batched``'s ``prepare``): per scale, the scaled image and, with
    ``flip``, its horizontal flip."""
    inputs = []
    for scale in scales:
        scaled = scaled_input(image, scale)
        inputs.append((scaled, scaled[:, ::-1]) if flip else (scaled,))
    return inputs


def resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
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


def default_host_threads() -> int:
    """Threads that prepare inference inputs when none are asked for: the CPU cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _prefetched(function: Callable, items: Iterable, threads: int) -> Iterator[tuple]:
    """Yields ``(item, function(item))`` in order, computing up to ``2 * threads`` items ahead on a thread pool."""
    if threads <= 1:
        for item in items:
            yield item, function(item)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="inference-inputs") as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append((item, pool.submit(function, item)))
            if len(pending) >= 2 * threads:
                ready_item, ready = pending.popleft()
                yield ready_item, ready.result()
        while pending:
            ready_item, ready = pending.popleft()
            yield ready_item, ready.result()


def iterate_batched(
    forward: Forward,
    items: Iterable[tuple[str, Any]],
    *,
    prepare: Callable[[Any], Sequence[Sequence[np.ndarray]]],
    create_accumulator: Callable[[Any], Accumulator],
    group_size: int,
    images_per_call: int,
    pad_multiple: int,
    batch_multiple: int = 1,
    host_threads: int = 0,
    max_pixels_per_call: int = 0,
    budget_field: str = "infer.max_pixels_per_call",
) -> Iterator[tuple[str, Any]]:
    """Runs every input of every item through ``forward`` in batches and yields each item's accumulated result.

    Args:
      forward: the network call (see ``Forward``).
      items: ``(id, item)`` pairs; ids must be unique.
      prepare: ``item -> inputs``; each input is a group of ``group_size`` uint8 ``(h, w, 3)`` arrays of the same
        size (e.g. an image at one scale and its flip), placed in consecutive slots of one call. Runs on the
        thread pool.
      create_accumulator: ``item -> Accumulator``, called (in the main thread) when the item's inputs are ready.
      group_size: arrays per input.
      images_per_call: inputs (groups) per forward call.
      pad_multiple: inputs are padded up to a multiple of this side (their size bucket).
      batch_multiple: a call's batch size (``images_per_call * group_size``) is rounded up to a multiple of this
        (the number of devices the call is split over).
      host_threads: threads that run ``prepare`` ahead; 0 = ``default_host_threads()``.
      max_pixels_per_call: padded input pixels one call may hold (``inputs_per_call``); 0 = no budget. The call's
        batch is still rounded up to ``batch_multiple``, so each device has at least one slot.
      budget_field: the config field that sets ``max_pixels_per_call``, named in ``InputOverBudgetError``.

    Yields:
      ``(id, accumulator.result())``, in completion order.

    Raises:
      InputOverBudgetError: an input over ``max_pixels_per_call`` even alone (names the image and the field).
      ValueError: a repeated id, an input group of the wrong size or an empty input (names the image).
      Exception: whatever ``prepare``, ``forward`` or an accumulator raised, with a note naming the image(s).
    """
    # Per size bucket: the inputs (groups) of a call and its batch size.
    capacity: dict[tuple[int, int], tuple[int, int]] = {}

    def bucket_capacity(bucket: tuple[int, int]) -> tuple[int, int]:
        if bucket not in capacity:
            inputs = inputs_per_call(
                bucket, group_size=group_size, images_per_call=images_per_call, max_pixels_per_call=max_pixels_per_call
            )
            capacity[bucket] = (inputs, -(-inputs * group_size // batch_multiple) * batch_multiple)
        return capacity[bucket]

    # Per size bucket: the uint8 batch being filled and the box of each slot ((0, 0, height, width); empty for unused
    # slots), the (id, input size) of each group in it, and a spent batch and boxes to fill again.
    batches: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    entries: dict[tuple[int, int], list[tuple[str, tuple[int, int]]]] = {}
    spent: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    accumulators: dict[str, Accumulator] = {}
    remaining: dict[str, int] = {}
    in_flight: list[tuple] = []

    def dispatch(bucket) -> Iterator[tuple[str, Any]]:
        images, boxes = batches.pop(bucket)
        call_entries = entries.pop(bucket)
        try:
            outputs = forward(images, boxes)
        except Exception as error:
            _note_images(error, [item_id for item_id, _ in call_entries], f"running a {bucket[0]}x{bucket[1]} call of")
            raise
        in_flight.append((bucket, images, boxes, call_entries, outputs))
        if len(in_flight) > 1:
            yield from collect(in_flight.pop(0))

    def collect(call) -> Iterator[tuple[str, Any]]:
        bucket, images, boxes, call_entries, pending_outputs = call
        try:
            outputs = np.asarray(pending_outputs)
        except Exception as error:
            _note_images(error, [item_id for item_id, _ in call_entries], f"running a {bucket[0]}x{bucket[1]} call of")
            raise
        # Only now, with the call's outputs fetched, may its input buffers be filled again.
        spent[bucket] = (images, boxes)
        for position, (item_id, input_size) in enumerate(call_entries):
            try:
                accumulators[item_id].add(outputs[position * group_size : (position + 1) * group_size], input_size)
                remaining[item_id] -= 1
                result = accumulators.pop(item_id).result() if remaining[item_id] == 0 else None
            except Exception as error:
                _note_images(error, [item_id], "accumulating the outputs of")
                raise
            if remaining[item_id] == 0:
                del remaining[item_id]
                yield item_id, result

    def prepare_item(pair):
        try:
            return prepare(pair[1])
        except Exception as error:
            _note_images(error, [pair[0]], "preparing the inputs of")
            raise

    for (item_id, item), inputs in _prefetched(prepare_item, items, host_threads or default_host_threads()):
        if item_id in accumulators:
            raise ValueError(f"Image id {item_id!r} appears twice in the inference stream.")
        for group in inputs:
            if len(group) != group_size:
                raise ValueError(f"Image {item_id!r}: an input group has {len(group)} arrays, expected {group_size}.")
            height, width = group[0].shape[:2]
            if height < 1 or width < 1:
                raise ValueError(f"Image {item_id!r}: an input of size {height}x{width} has no pixels.")
            bucket = puzzle.padded_size(height, width, pad_multiple)
            if max_pixels_per_call > 0 and group_size * bucket[0] * bucket[1] > max_pixels_per_call:
                raise InputOverBudgetError(
                    f"Image {item_id!r}: an input of {height}x{width} ({group_size} array(s) padded to "
                    f"{bucket[0]}x{bucket[1]}: {group_size * bucket[0] * bucket[1]:,} pixels) exceeds "
                    f"{budget_field}={max_pixels_per_call:,} even alone. Raise {budget_field} if the device has the "
                    "memory, or resize the image (or use smaller scales)."
                )
        try:
            accumulators[item_id] = create_accumulator(item)
        except Exception as error:
            _note_images(error, [item_id], "starting the accumulator of")
            raise
        remaining[item_id] = len(inputs)
        if not inputs:
            del remaining[item_id]
            yield item_id, accumulators.pop(item_id).result()
        for group in inputs:
            height, width = group[0].shape[:2]
            bucket = puzzle.padded_size(height, width, pad_multiple)
            call_inputs, batch_size = bucket_capacity(bucket)
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
            slot = len(entries[bucket]) * group_size
            for offset, array in enumerate(group):
                images[slot + offset, :height, :width] = array
                boxes[slot + offset] = (0, 0, height, width)
            entries[bucket].append((item_id, (height, width)))
            if len(entries[bucket]) == call_inputs:
                yield from dispatch(bucket)
    for bucket in list(batches):
        yield from dispatch(bucket)
    while in_flight:
        yield from collect(in_flight.pop(0))
