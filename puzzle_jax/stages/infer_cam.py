"""Stage ``infer_cam``: multi-scale + flip CAMs of ``config.infer.split`` (spec §5), one ``.npz`` per image.

Reads ``train_cam/model``; writes ``infer_cam/cams/<id>.npz`` with ``keys``, ``cam`` and ``hr_cam`` (numpy only).
Each file is written atomically and existing files are skipped, so an interrupted run resumes where it stopped.
Processes split the images between them (every image exactly once).
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
from tqdm import tqdm

from puzzle_jax import cam_inference, classifier_training, fileio, sharding
from puzzle_jax.data import datasets
from puzzle_jax.pipeline import Workdir


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    model_dir = workdir.exported_model("train_cam")
    model, model_config = classifier_training.load_exported_classifier(model_dir)
    # Images and image-level labels only: the masks are not decoded.
    source, _ = datasets.load_split_from_config(config.data, config.infer.split, decode_masks=False)
    # Each process computes its own images' CAMs: a mesh of its own devices, no collective across processes.
    mesh = sharding.create_local_mesh(config.mesh.num_devices)
    forward = cam_inference.create_forward(model, mesh)
    output_dir = workdir.cam_dir()
    os.makedirs(output_dir, exist_ok=True)
    indices = range(jax.process_index(), len(source), jax.process_count())
    progress = tqdm(total=len(indices), desc="infer_cam", disable=jax.process_index() != 0, dynamic_ncols=True)
    skipped = 0

    def records():
        nonlocal skipped
        for index in indices:
            record = source[index]
            if os.path.exists(_cam_path(output_dir, record["id"])):
                skipped += 1  # complete from an earlier run
                progress.update(1)
                continue
            yield record["id"], record["image"], record["labels"]

    written = 0
    started = time.perf_counter()
    for image_id, cams in cam_inference.iterate_cams(
        forward,
        records(),
        scales=tuple(config.infer.scales),
        flip=bool(config.infer.flip),
        pad_multiple=int(config.infer.pad_multiple),
        output_stride=int(model_config["output_stride"]),
        images_per_call=int(config.infer.images_per_call),
        batch_multiple=mesh.devices.size,
        host_threads=int(config.infer.host_threads),
    ):
        fileio.write_npz(_cam_path(output_dir, image_id), **cams)
        written += 1
        progress.update(1)
        progress.set_postfix(images_per_second=f"{written / (time.perf_counter() - started):.1f}", refresh=False)
    progress.close()
    return {
        "cam_dir": output_dir,
        "written": written,
        "skipped_existing": skipped,
        "scales": list(config.infer.scales),
        "flip": bool(config.infer.flip),
        "split": config.infer.split,
    }


def _cam_path(output_dir: str, image_id: str) -> str:
    return os.path.join(output_dir, f"{image_id}.npz")
