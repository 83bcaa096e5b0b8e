"""Stage ``eval_seg``: the segmenter's labels of ``config.seg.split`` scored against its ground truth.

Reads ``infer_seg/<split>/<id>.png`` and the split's masks: one confusion matrix over the split (VOC devkit rule: GT
255 ignored), mIoU and the per-class table; with the summaries of the earlier stages, the whole chain CAM -> random
walk -> pseudo labels (``eval.split`` or ``infer.split``) -> segmentation (``seg.split``) is printed and summarised
as ``chain``. ``eval_seg/gallery/index.html`` draws ``eval.gallery_images`` images (a sample spread over the split,
worst first) with the prediction beside the ground truth.
"""

from __future__ import annotations

import jax
import ml_collections

from puzzle_jax.data import datasets
from puzzle_jax.evaluation import report
from puzzle_jax.pipeline import Workdir, scored_split
from puzzle_jax.refine import label_folders
from puzzle_jax.viz import gallery


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    seg = config.seg
    records, info = datasets.load_split_from_config(config.data, seg.split, field="seg.split")
    prediction_dir = workdir.segmentation_dir(seg.split)
    scores = label_folders.score_label_folder(
        records,
        label_dir=prediction_dir,
        score_dir=None,
        num_classes=info.num_classes + 1,
        show_progress=jax.process_index() == 0,
        description="eval_seg",
    )
    summary: dict = {"prediction_dir": prediction_dir, "split": seg.split}
    if scores["confusion"].sum() == 0:
        summary["num_images"] = scores["images"]
        if jax.process_index() == 0:
            print(f"[eval_seg] {seg.split}: {scores['images']} images without ground truth: nothing scored", flush=True)
        return summary
    summary.update(report.label_summary(scores["confusion"], scores["images"]))
    train_seg = workdir.read_summary("train_seg") or {}
    summary["labels"] = train_seg.get("labels", seg.labels)
    summary["chain"] = report.pipeline_chain(
        workdir.read_summary("eval_cam"),
        workdir.read_summary("infer_rw"),
        workdir.read_summary("pseudo_labels"),
        summary,
        rw_threshold=config.refine.rw_threshold,
        label_split=scored_split(config),
        segmentation_split=seg.split,
    )
    summary["gallery"] = None
    if jax.process_index() == 0:
        class_names = ["background", *info.class_names]
        print(report.format_label_table(class_names, summary, title=f"Segmentation mIoU ({seg.split})"), flush=True)
        print(report.format_chain_table(summary["chain"], title="Pipeline chain (mIoU %)"), flush=True)
        if config.eval.gallery_images > 0:
            summary["gallery"] = gallery.write_segmentation_gallery(
                workdir.gallery_dir("eval_seg"),
                records,
                count=config.eval.gallery_images,
                class_names=info.class_names,
                prediction_dir=prediction_dir,
                label_source=str(summary["labels"]).replace("_", " "),
                title=f"Segmentation of {workdir.root} ({seg.split})",
            )
            print(f"Segmentation gallery (a sample of {seg.split}, worst first): {summary['gallery']}", flush=True)
    return summary
