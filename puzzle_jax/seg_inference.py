"""Multi-scale + flip segmentation with an exported segmenter (spec §9, inference), over the batched-inference
engine (``batched_inference``), and the loop of the ``infer_seg`` stage and of ``predict`` (``write_segmentation``).

For each scale (the authors: 0.5, 1, 1.5, 2) the image is resized on the host (PIL bicubic) and batched as uint8
with its horizontal flip. The logits of the input's pixels (the segmenter upsamples to its input's size) are
flipped back where flipped, resized bilinearly (align_corners=False) to the image's size and summed over the eight
maps; the softmax of the sum gives the class probabilities. Labels are their argmax, or the dense CRF's
(``refine.crf.refine_probabilities``) run in a pool of host processes or as Ray tasks (``per_image.host_compute``;
a Ray task gets the image and its probabilities through Ray's object store).

Deviation from the authors, small: inputs are zero-padded (the mean colour after normalisation) to their size
bucket so that XLA compiles once per bucket, not once per image (``infer.pad_multiple``); the authors run each
input at its own size. The padding enters the image-pooling branch's average and the border's receptive fields,
as the authors' own validation does (they place val images on a 512 canvas). ``pad_multiple`` 16 keeps it within
15 pixels per side.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from puzzle_jax import batched_inference, labels, per_image, sharding
from puzzle_jax.refine import crf, label_folders

Forward = batched_inference.Forward


def create_forward(model: nnx.Module, mesh: jax.sharding.Mesh | None = None) -> Forward:
    """Returns ``(images, boxes) -> float32 logits (N, H, W, C)`` of the padded inputs
    (``batched_inference.create_forward``); the model runs without dropout."""

    def logits(segmenter, images):
        return segmenter(images).astype(jnp.float32)

    return batched_inference.create_forward(model, logits, mesh)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32, stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted, dtype=np.float32)
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


class ProbabilityAccumulator:
    """Sums one image's logits over scales (each flip merged back) at the image's size; its result is the softmax."""

    def __init__(self, image: np.ndarray, *, flip: bool):
        self.image = image
        self.height, self.width = image.shape[:2]
        self.flip = flip
        self.logit_sum: np.ndarray | float = 0.0

    def add(self, logits: np.ndarray, input_size: tuple[int, int]) -> None:
        height, width = input_size
        logits = logits[:, :height, :width]
        for index, maps in enumerate(logits):
            maps = maps[:, ::-1] if self.flip and index == 1 else maps
            self.logit_sum = self.logit_sum + batched_inference.resize_maps(
                np.ascontiguousarray(maps), self.height, self.width
            )

    def result(self) -> dict[str, np.ndarray]:
        return {"image": self.image, "probabilities": softmax(np.asarray(self.logit_sum, np.float32))}


def iterate_probabilities(
    forward: Forward,
    images: Iterable[tuple[str, np.ndarray]],
    *,
    scales: Sequence[float],
    flip: bool,
    pad_multiple: int,
    images_per_call: int,
    batch_multiple: int = 1,
    host_threads: int = 0,
    max_pixels_per_call: int = 0,
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """The class probabilities of a stream of images, inputs of one padded size batched across images.

    Args:
      forward: from ``create_forward`` (with a mesh, to spread each call over the devices).
      images: ``(id, uint8 (H, W, 3) image)`` pairs.
      scales: input scales (the authors: 0.5, 1, 1.5, 2); a side is at least 1 pixel at any scale.
      flip: also run each input flipped and add its flipped-back logits.
      pad_multiple: inputs are zero-padded (after normalisation) up to a multiple of this side.
      images_per_call: inputs (an image at one scale, with its flip) per forward call.
      batch_multiple: the call's batch size is rounded up to a multiple of this (the number of devices).
      host_threads: threads that resize the next images' inputs; 0 = the CPU cores, at most 8.
      max_pixels_per_call: padded input pixels per call (``batched_inference.iterate_batched``); 0 = no budget.

    Yields:
      ``(id, {"image": image, "probabilities": float32 (H, W, C)})`` in completion order.
    """
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive and at least one; got {tuple(scales)}.")

    return batched_inference.iterate_batched(
        forward,
        images,
        prepare=lambda image: batched_inference.scaled_inputs(image, scales, flip),
        create_accumulator=lambda image: ProbabilityAccumulator(image, flip=flip),
        group_size=2 if flip else 1,
        images_per_call=images_per_call,
        pad_multiple=pad_multiple,
        batch_multiple=batch_multiple,
        host_threads=host_threads,
        max_pixels_per_call=max_pixels_per_call,
    )


def label_maps(
    probabilities: Iterable[tuple[str, dict[str, np.ndarray]]],
    *,
    crf_iterations: int,
    backend: per_image.HostBackend,
) -> Iterator[tuple[str, np.ndarray]]:
    """Label maps from ``iterate_probabilities``' stream: the argmax, or with ``crf_iterations`` > 0 the dense CRF's
    labels computed where ``backend`` says (``per_image.host_compute``)."""
    if crf_iterations < 0:
        raise ValueError(f"crf_iterations must be >= 0 (0 = no CRF); got {crf_iterations}.")
    if crf_iterations == 0:
        for image_id, payload in probabilities:
            yield image_id, payload["probabilities"].argmax(axis=-1).astype(np.uint8)
        return
    compute = per_image.host_compute(
        crf.probability_labels,
        prepare=lambda record: (record["image"], record["probabilities"], crf_iterations),
        backend=backend,
    )
    yield from compute({"id": image_id, **payload} for image_id, payload in probabilities)


def write_segmentation(
    model: nnx.Module,
    source: Sequence[dict[str, Any]],
    output_dir: str,
    *,
    scales: Sequence[float],
    flip: bool,
    crf_iterations: int,
    backend: per_image.HostBackend,
    infer: Any,
    num_devices: int,
    description: str = "infer_seg",
) -> dict[str, int]:
    """Writes ``<output_dir>/<id>.png`` (``labels.write_label_png``: VOC palette) for every image of this process's
    share of ``source`` that has none; resumable and atomic (``per_image.write_per_image``).

    Args:
      model: an exported segmenter (``checkpointing.load_exported(..., family="segmentation")``).
      source: records with ``id`` and ``image``.
      output_dir: the folder of label PNGs.
      scales, flip: as in ``iterate_probabilities``.
      crf_iterations: mean-field steps of the dense CRF; 0 = the argmax of the probabilities.
      backend: where the CRF runs (``per_image.HostBackend``: processes or Ray tasks).
      infer: ``config.infer`` (padding, inputs and pixels per call, host threads).
      num_devices: devices of this process that each call is split over (0 = all).
      description: the progress bar's label.
    """
    mesh = sharding.create_local_mesh(num_devices)
    forward = create_forward(model, mesh)

    def compute(records):
        probabilities = iterate_probabilities(
            forward,
            ((record["id"], record["image"]) for record in records),
            scales=tuple(scales),
            flip=bool(flip),
            pad_multiple=int(infer.pad_multiple),
            images_per_call=int(infer.images_per_call),
            batch_multiple=mesh.devices.size,
            host_threads=int(infer.host_threads),
            max_pixels_per_call=int(infer.max_pixels_per_call),
        )
        return label_maps(probabilities, crf_iterations=crf_iterations, backend=backend)

    return per_image.write_per_image(
        source,
        output_path=functools.partial(label_folders.label_path, output_dir),
        compute=compute,
        write=labels.write_label_png,
        description=description,
    )
