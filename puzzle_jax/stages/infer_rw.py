"""Stage ``infer_rw``: the random walk of ``infer_cam``'s CAMs over ``train_aff``'s class boundaries (spec §8).

Reads ``train_aff/model`` and ``infer_cam/cams/``; writes ``infer_rw/rw/<id>.npz`` (``cam_files``: ``keys``, ``rw``)
for ``config.infer.split``, atomically and resumably (``rw_inference``). The walk's maps are then scored like CAMs,
with a background-threshold sweep against the ground truth of ``config.eval.split``, and printed as a table.
"""

from __future__ import annotations

import jax
import ml_collections

from puzzle_jax import checkpointing, rw_inference
from puzzle_jax.data import datasets
from puzzle_jax.evaluation import cam_scoring, miou, report
from puzzle_jax.pipeline import Workdir, scored_split


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    model, _ = checkpointing.load_exported(workdir.exported_model("train_aff"), family="affinity")
    # Images only: the masks are read where the walk is scored.
    source, info = datasets.load_split_from_config(config.data, config.infer.split, decode_masks=False)
    counts = rw_inference.write_walks(
        model, source, workdir.cam_dir(), workdir.random_walk_dir(), config.refine,
        num_devices=config.mesh.num_devices, images_per_call=config.infer.images_per_call,
        host_threads=config.infer.host_threads, max_pixels_per_call=config.infer.max_pixels_per_call,
    )
    class_names = ["background", *info.class_names]
    scored, _ = datasets.load_split_from_config(config.data, scored_split(config), field="eval.split")
    result = cam_scoring.sweep_split(
        scored, workdir.random_walk_dir(), num_classes=len(class_names),
        thresholds=miou.threshold_range(*config.eval.threshold_range), produced_by="infer_rw",
        show_progress=jax.process_index() == 0, description="infer_rw scores",
    )
    print(report.format_sweep_table(class_names, result, title="Random-walk mIoU"), flush=True)
    summary = report.sweep_summary(class_names, result)
    return {**counts, **summary, "split": config.infer.split, "scored_split": scored_split(config)}
