"""Stage ``eval_cam``: CAM mIoU of ``infer_cam``'s outputs with a background-threshold sweep (spec §6), on the
images of ``config.eval.split`` (default: ``infer.split``).

One confusion matrix per threshold over the whole split (every class including background, GT 255 ignored); the
best threshold's mIoU, its per-class IoU and the whole sweep go to the summary and are printed as a table, with,
where the dataset has part maps (the demo; a ``voc_folder`` with ``SegmentationParts/``), how much of the objects'
bodies and discriminative parts the CAMs recover (``part_recall``); ``eval_cam/gallery/index.html`` draws
``eval.gallery_images`` images (beside ``eval.compare_workdir``'s CAMs).
"""

from __future__ import annotations

import os

import jax
import ml_collections

from puzzle_jax.data import datasets
from puzzle_jax.evaluation import cam_scoring, miou, report
from puzzle_jax.pipeline import Workdir, scored_split
from puzzle_jax.viz import gallery


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    split = scored_split(config)
    source, info = datasets.load_split_from_config(config.data, split, field="eval.split")
    class_names = ["background", *info.class_names]
    thresholds = miou.threshold_range(*config.eval.threshold_range)
    result = cam_scoring.sweep_split(
        source, workdir.cam_dir(), num_classes=len(class_names), thresholds=thresholds, produced_by="infer_cam",
        show_progress=jax.process_index() == 0, description="eval_cam",
    )
    print(report.format_sweep_table(class_names, result), flush=True)
    gallery_path = None
    if config.eval.gallery_images > 0 and jax.process_index() == 0:
        compare = Workdir(config.eval.compare_workdir) if config.eval.compare_workdir else None
        if compare is not None and not os.path.isdir(compare.cam_dir()):
            raise FileNotFoundError(f"eval.compare_workdir: {compare.cam_dir()} does not exist (run infer_cam there).")
        gallery_path = gallery.write_cam_gallery(
            workdir.gallery_dir("eval_cam"), source, workdir.cam_dir(), count=config.eval.gallery_images,
            class_names=info.class_names, threshold=result["best_threshold"],
            title=f"CAMs of {workdir.root} ({split}, threshold {report.threshold_text(result['best_threshold'])})",
            run_name=os.path.basename(workdir.root), compare_dir=compare and compare.cam_dir(),
            compare_name=compare and os.path.basename(compare.root),
        )
        drawn = min(config.eval.gallery_images, len(source))
        print(f"CAM gallery ({drawn} of the split's {len(source)} images, worst first): {gallery_path}", flush=True)
    return {
        **report.sweep_summary(class_names, result),
        "split": split,
        "gallery": gallery_path,
    }
