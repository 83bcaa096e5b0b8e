"""Stage ``infer_cam``: multi-scale + flip CAMs of ``config.infer.split`` (spec §5), one CAM file per image.

Reads ``train_cam/model``; writes ``infer_cam/cams/<id>.npz`` (``cam_files``: ``keys``, ``cam``, ``hr_cam``). Each
file is written atomically and existing files are skipped, so an interrupted run resumes where it stopped.
Processes split the images between them (every image exactly once).
"""

from __future__ import annotations

import ml_collections

from puzzle_jax import cam_inference, checkpointing
from puzzle_jax.data import datasets
from puzzle_jax.pipeline import Workdir


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    model, model_config = checkpointing.load_exported(workdir.exported_model("train_cam"), family="classifier")
    # Images and image-level labels only: the masks are not decoded.
    source, _ = datasets.load_split_from_config(config.data, config.infer.split, decode_masks=False)
    cam_dir = workdir.cam_dir()
    counts = cam_inference.write_cams(
        model, model_config, source, cam_dir, config.infer, num_devices=config.mesh.num_devices
    )
    infer = config.infer
    return {"cam_dir": cam_dir, **counts, "scales": list(infer.scales), "flip": bool(infer.flip), "split": infer.split}
