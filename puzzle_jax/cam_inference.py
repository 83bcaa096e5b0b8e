"""Multi-scale + flip CAMs of an exported classifier (spec §5): the CAM arithmetic over the batched-inference
engine (``batched_inference``), and the ``infer_cam`` stage's loop (``write_cams``).

For each scale the image is resized on the host (PIL bicubic, as the authors) and batched as uint8 with its
horizontal flip by the engine (size buckets, uint8 inputs normalised on the device, host work on a thread pool, one
call in flight). The class maps of the valid region go through ReLU, the flipped map is flipped back and added, and
the sum over scales is accumulated at two resolutions with bilinear (align_corners=False) resizing: the strided map
``(ceil(H/4), ceil(W/4))`` for the random walk and the full-resolution map for evaluation (resized to the next
multiples of 16, then cropped to ``(H, W)``, as the authors do). Only the image's ground-truth classes are kept
(resizing is per channel, so flipping, resizing and summing only those changes no value), each divided by its own
spatial maximum (+1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from puzzle_jax import batched_inference, cam_files, per_image, sharding

# Added to each class's maximum before dividing, as the authors do, so an all-zero map stays zero.
NORMALISATION_EPSILON = 1e-5

Forward = batched_inference.Forward


def create_forward(model: nnx.Module, mesh: jax.sharding.Mesh | None = None) -> Forward:
    """Returns ``(images, boxes) -> ReLU'd class maps (N, h, w, C)`` (``batched_inference.create_forward``)."""

    def relu_class_maps(classifier, images):
        _, class_maps = classifier(images)
        return jax.nn.relu(class_maps.astype(jnp.float32))

    return batched_inference.create_forward(model, relu_class_maps, mesh)


class CamAccumulator:
    """Sums one image's flip-merged maps of its ground-truth classes over scales, at both resolutions."""

    def __init__(self, image: np.ndarray, labels: np.ndarray, *, flip: bool, output_stride: int):
        self.height, self.width = image.shape[:2]
        self.class_ids = np.flatnonzero(np.asarray(labels) > 0)
        self.flip = flip
        self.output_stride = output_stride
        self.strided_sum = 0.0
        self.full_sum = 0.0

    def add(self, maps: np.ndarray, input_size: tuple[int, int]) -> None:
        valid_height = math.ceil(input_size[0] / self.output_stride)
        valid_width = math.ceil(input_size[1] / self.output_stride)
        maps = maps[:, :valid_height, :valid_width, self.class_ids]
        summed = maps[0] + maps[1][:, ::-1] if self.flip else maps[0]
        self.strided_sum = self.strided_sum + batched_inference.resize_maps(
            summed, math.ceil(self.height / 4), math.ceil(self.width / 4)
        )
        # The authors upsample to the next multiple of 16 and crop, rather than resizing to (H, W) directly.
        upsampled = batched_inference.resize_maps(
            summed, 16 * math.ceil(self.height / 16), 16 * math.ceil(self.width / 16)
        )
        self.full_sum = self.full_sum + upsampled[: self.height, : self.width]

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
    max_pixels_per_call: int = 0,
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """``compute_cams`` for a stream of images, batching inputs of the same padded size across images.

    Args:
      forward: from ``create_forward`` (with a mesh, to spread each call over the devices).
      records: ``(id, uint8 image, multi-hot labels)`` triples.
      scales, flip, pad_multiple, output_stride: as in ``compute_cams``.
      images_per_call: inputs (images at one scale, with their flips) per forward call.
      batch_multiple: the call's batch size is rounded up to a multiple of this (the number of devices).
      host_threads: threads that resize the next images' inputs; 0 = the CPU cores, at most 8.
      max_pixels_per_call: padded input pixels per call (``batched_inference.iterate_batched``); 0 = no budget.

    Yields:
      ``(id, payload)`` with the payload of ``compute_cams``, in completion order.
    """

    def prepare(item):
        image, _ = item
        return batched_inference.scaled_inputs(image, scales, flip)

    def create_accumulator(item):
        image, labels = item
        return CamAccumulator(image, labels, flip=flip, output_stride=output_stride)

    return batched_inference.iterate_batched(
        forward,
        ((image_id, (image, labels)) for image_id, image, labels in records),
        prepare=prepare,
        create_accumulator=create_accumulator,
        group_size=2 if flip else 1,
        images_per_call=images_per_call,
        pad_multiple=max(pad_multiple, output_stride),
        batch_multiple=batch_multiple,
        host_threads=host_threads,
        max_pixels_per_call=max_pixels_per_call,
    )


class _LogitAccumulator:
    """An image's logits: the mean of its class maps over the cells of its (unpadded) input."""

    def __init__(self, output_stride: int):
        self.output_stride = output_stride
        self.logits = None

    def add(self, maps: np.ndarray, input_size: tuple[int, int]) -> None:
        rows, columns = (math.ceil(side / self.output_stride) for side in input_size)
        self.logits = maps[0, :rows, :columns].mean(axis=(0, 1))

    def result(self) -> np.ndarray:
        return self.logits


def classify(
    model: nnx.Module,
    records: Sequence[dict[str, Any]],
    *,
    output_stride: int,
    pad_multiple: int = 64,
    images_per_call: int = 8,
    num_devices: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Image-level logits of a classifier, one forward pass per image at its own size (batched by size bucket).

    The logits are the mean of the class maps over the image's cells, as the classifier's own logits are over its
    whole input; the cells at the bucket padding's border see some zeros, so they can differ slightly from a pass on
    the unpadded image.

    Returns:
      ``(logits (N, C), labels (N, C))`` in record order.
    """
    mesh = sharding.create_local_mesh(num_devices)

    def class_maps(classifier, images):
        return classifier(images)[1].astype(jnp.float32)

    forward = batched_inference.create_forward(model, class_maps, mesh)
    labels = []

    def images():
        for index, record in enumerate(records):
            labels.append(np.asarray(record["labels"], np.float32))
            yield str(index), record["image"]

    logits = dict(
        batched_inference.iterate_batched(
            forward,
            images(),
            prepare=lambda image: [(image,)],
            create_accumulator=lambda image: _LogitAccumulator(output_stride),
            group_size=1,
            images_per_call=images_per_call,
            pad_multiple=max(pad_multiple, output_stride),
            batch_multiple=mesh.devices.size,
        )
    )
    return np.stack([logits[str(index)] for index in range(len(labels))]), np.stack(labels)


def write_cams(
    model: nnx.Module,
    model_config: dict[str, Any],
    source: Sequence[dict[str, Any]],
    cam_dir: str,
    infer: Any,
    *,
    num_devices: int,
) -> dict[str, int]:
    """Writes the CAM file (``cam_files``) of every image of this process's share of ``source`` that has none.

    Args:
      model: an exported classifier (``checkpointing.load_exported``).
      model_config: its model config (for the output stride).
      source: the split's records (``id``, ``image``, ``labels``).
      cam_dir: the output folder.
      infer: ``config.infer`` (scales, flip, padding, inputs and pixels per call, host threads).
      num_devices: devices of this process that each call is split over (0 = all).

    Returns:
      ``{"written": ..., "skipped_existing": ...}`` for this process.
    """
    # Each process computes its own images' CAMs: a mesh of its own devices, no collective across processes.
    mesh = sharding.create_local_mesh(num_devices)
    forward = create_forward(model, mesh)

    def compute(records):
        return iterate_cams(
            forward,
            ((record["id"], record["image"], record["labels"]) for record in records),
            scales=tuple(infer.scales),
            flip=bool(infer.flip),
            pad_multiple=int(infer.pad_multiple),
            output_stride=int(model_config["output_stride"]),
            images_per_call=int(infer.images_per_call),
            batch_multiple=mesh.devices.size,
            host_threads=int(infer.host_threads),
            max_pixels_per_call=int(infer.max_pixels_per_call),
        )

    def write(path, payload):
        cam_files.write_cam_file(path, **payload)

    return per_image.write_per_image(
        source,
        output_path=lambda image_id: cam_files.path_of(cam_dir, image_id),
        compute=compute,
        write=write,
        description="infer_cam",
    )


def _normalise(maps: np.ndarray) -> np.ndarray:
    """(h, w, K) -> (K, h, w), each map divided by its own maximum + epsilon."""
    maps = np.moveaxis(np.asarray(maps, np.float32), -1, 0)
    maxima = maps.reshape(maps.shape[0], -1).max(axis=1) if maps.size else np.zeros(0, np.float32)
    return maps / (maxima[:, None, None] + NORMALISATION_EPSILON)
