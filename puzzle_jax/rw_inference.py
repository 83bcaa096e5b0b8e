"""The random walk of an image's CAMs over AffinityNet's class boundaries (spec §8), and the ``infer_rw`` stage's loop
(``write_walks``).

Per image: the image and its horizontal flip go through the exported AffinityNet as one group of the batched-inference
engine (``batched_inference``), each zero-padded to a canvas of ``edge_canvas`` pixels a side (the authors pad every
image to 512 x 512; the side branches' GroupNorm takes statistics over the whole canvas, so a canvas of another size
would change the edges). Each logit map is cropped to the image's stride-4 grid ``(ceil(H/4), ceil(W/4))`` before the
flipped one is flipped back, and the edge is ``sigmoid(mean of the two)``. The CAM file's strided ``cam`` is then
propagated over the edge (``refine.random_walk.propagate_to_edge``), upsampled x4, cropped and divided by its global
maximum (as ``random_walk.upsample_walk``), and written as ``rw`` with the CAM file's ``keys``.

The walk runs on the device, jitted once per size bucket: the grid is padded right and bottom to a multiple of
``WALK_BUCKET`` cells with edge 1.0 and CAM 0, and the classes to a power of two with zero maps. Both leave the
image's result unchanged: a padded cell's affinity to every other cell is 0 (the edge 1.0 lies on every path to it),
so it neither receives nor gives mass (the authors pad with 1.0 for the same reason), and classes are independent.
The x4 upsampling runs in the same compiled call, with the padded cells replaced by the grid's last row and column (the
border that bilinear resizing replicates), so that no image size compiles anything of its own.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from puzzle_jax import batched_inference, cam_files, per_image, sharding
from puzzle_jax.refine import random_walk

# The stride-4 grid of the walk is padded up to a multiple of this many cells (one compilation per bucket).
WALK_BUCKET = 16


def create_forward(model: nnx.Module, mesh: jax.sharding.Mesh | None = None) -> batched_inference.Forward:
    """Returns ``(images, boxes) -> edge logits (N, h, w)`` of an exported AffinityNet."""

    def edge_logits(network, images):
        return network(images).astype(jnp.float32)

    return batched_inference.create_forward(model, edge_logits, mesh)


@functools.partial(jax.jit, static_argnames=("radius", "beta", "exp_times"))
def _walk_bucket(cams, edge, rows, columns, *, radius, beta, exp_times):
    """The walk of a bucket-padded grid, upsampled x4 as if the grid ended at ``rows`` x ``columns``: the cells
    beyond are replaced by the last real row and column before upsampling, as the bilinear resize of the unpadded
    grid replicates its border."""
    walked = random_walk.propagate_to_edge(cams, edge, radius=radius, beta=beta, exp_times=exp_times)
    walked = walked[:, jnp.minimum(jnp.arange(walked.shape[1]), rows - 1)]
    walked = walked[:, :, jnp.minimum(jnp.arange(walked.shape[2]), columns - 1)]
    return random_walk.upsample_by_4(walked)


def walk(
    cams: np.ndarray, edge: np.ndarray, *, height: int, width: int, radius: int, beta: float, exp_times: int
) -> np.ndarray:
    """The random walk's ``rw`` of one image: ``cams`` ``(K, h, w)`` (stride 4) over ``edge`` ``(h, w)``, padded to
    its bucket, propagated, upsampled x4, cropped to ``(height, width)`` and divided by its global maximum (spec §8.5,
    as ``random_walk.upsample_walk``). Returns float32 ``(K, H, W)``."""
    classes, rows, columns = cams.shape
    if edge.shape != (rows, columns):
        raise ValueError(f"edge map of size {edge.shape} for CAMs of size {(rows, columns)}")
    if not (4 * (rows - 1) < height <= 4 * rows and 4 * (columns - 1) < width <= 4 * columns):
        raise ValueError(f"A {height}x{width} image does not match a stride-4 grid of {rows}x{columns}.")
    if classes == 0:
        return np.zeros((0, height, width), np.float32)
    padded_rows = WALK_BUCKET * math.ceil(rows / WALK_BUCKET)
    padded_columns = WALK_BUCKET * math.ceil(columns / WALK_BUCKET)
    padded_classes = 1 << (classes - 1).bit_length()
    padded_cams = np.zeros((padded_classes, padded_rows, padded_columns), np.float32)
    padded_cams[:classes, :rows, :columns] = cams
    padded_edge = np.ones((padded_rows, padded_columns), np.float32)
    padded_edge[:rows, :columns] = edge
    upsampled = _walk_bucket(
        padded_cams, padded_edge, rows, columns, radius=radius, beta=float(beta), exp_times=int(exp_times)
    )
    rw = np.asarray(upsampled)[:classes, :height, :width]
    maximum = rw.max()
    return rw / maximum if maximum > 0 else np.zeros_like(rw)


class WalkAccumulator:
    """One image's edge (flip-merged logits, cropped to its stride-4 grid), then its walk."""

    def __init__(self, image_size: tuple[int, int], cam_file: dict[str, np.ndarray], settings: dict[str, Any]):
        self.height, self.width = image_size
        self.cam_file = cam_file
        self.settings = settings
        self.logits = None

    def add(self, outputs: np.ndarray, input_size: tuple[int, int]) -> None:
        rows, columns = math.ceil(input_size[0] / 4), math.ceil(input_size[1] / 4)
        logits = outputs[:, :rows, :columns]
        self.logits = (logits[0] + logits[1][:, ::-1]) / 2 if len(logits) == 2 else logits[0]

    def edge(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits.astype(np.float32)))

    def result(self) -> dict[str, np.ndarray]:
        rw = walk(self.cam_file["cam"], self.edge(), height=self.height, width=self.width, **self.settings)
        return {"keys": self.cam_file["keys"], "rw": rw}


def iterate_walks(
    forward: batched_inference.Forward,
    records: Iterable[tuple[str, np.ndarray, dict[str, np.ndarray]]],
    *,
    edge_canvas: int,
    flip: bool,
    radius: int,
    beta: float,
    exp_times: int,
    images_per_call: int,
    batch_multiple: int = 1,
    host_threads: int = 0,
    max_pixels_per_call: int = 0,
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """The ``rw`` payload of a stream of ``(id, uint8 image, CAM file contents)``; see the module docstring."""
    settings = {"radius": int(radius), "beta": float(beta), "exp_times": int(exp_times)}

    def prepare(item):
        image, _ = item
        return [(image, image[:, ::-1]) if flip else (image,)]

    def create_accumulator(item):
        image, cam_file = item
        return WalkAccumulator(image.shape[:2], cam_file, settings)

    return batched_inference.iterate_batched(
        forward,
        ((image_id, (image, cam_file)) for image_id, image, cam_file in records),
        prepare=prepare,
        create_accumulator=create_accumulator,
        group_size=2 if flip else 1,
        images_per_call=images_per_call,
        pad_multiple=edge_canvas,
        batch_multiple=batch_multiple,
        host_threads=host_threads,
        max_pixels_per_call=max_pixels_per_call,
    )


def read_strided_cams(cam_dir: str, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """The ``keys`` and strided ``cam`` of an image's CAM file, checked against the image's size.

    Raises:
      FileNotFoundError: the image has no CAM file (names the id and the file).
      ValueError: the file is unreadable or its grid does not match the image's (names both sizes).
    """
    path = cam_files.path_of(cam_dir, record["id"])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: image {record['id']!r} has no CAM file; run infer_cam for this split.")
    contents = cam_files.read_cam_file(path, ("cam",))
    height, width = record["image"].shape[:2]
    expected = (math.ceil(height / 4), math.ceil(width / 4))
    if contents["cam"].shape[1:] != expected:
        raise ValueError(
            f"{path}: its strided CAMs are {contents['cam'].shape[1]}x{contents['cam'].shape[2]}, but image "
            f"{record['id']!r} is {height}x{width} (stride-4 grid {expected[0]}x{expected[1]}): the CAMs belong to "
            "another image or dataset; rerun infer_cam."
        )
    return contents


def write_walks(
    model: nnx.Module,
    source: Sequence[dict[str, Any]],
    cam_dir: str,
    output_dir: str,
    refine: Any,
    *,
    num_devices: int,
    images_per_call: int,
    host_threads: int,
    max_pixels_per_call: int = 0,
) -> dict[str, int]:
    """Writes ``rw`` files (``cam_files``) for this process's share of ``source`` that has none; resumable.
    ``max_pixels_per_call`` bounds the padded input pixels of one edge call (``batched_inference``)."""
    mesh = sharding.create_local_mesh(num_devices)
    forward = create_forward(model, mesh)

    def compute(records):
        return iterate_walks(
            forward,
            ((record["id"], record["image"], read_strided_cams(cam_dir, record)) for record in records),
            edge_canvas=int(refine.edge_canvas),
            flip=True,
            radius=int(refine.rw_radius),
            beta=float(refine.rw_beta),
            exp_times=int(refine.rw_exp_times),
            images_per_call=images_per_call,
            batch_multiple=mesh.devices.size,
            host_threads=host_threads,
            max_pixels_per_call=max_pixels_per_call,
        )

    return per_image.write_per_image(
        source,
        output_path=lambda image_id: cam_files.path_of(output_dir, image_id),
        compute=compute,
        write=lambda path, payload: cam_files.write_cam_file(path, **payload),
        description="infer_rw",
    )
