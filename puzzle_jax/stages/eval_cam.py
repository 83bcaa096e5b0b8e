"""Stage ``eval_cam``: CAM mIoU of ``infer_cam``'s outputs with a background-threshold sweep (spec §6).

One confusion matrix per threshold over the whole split (every class including background, GT 255 ignored); the
best threshold's mIoU, its per-class IoU and the whole sweep go to the summary and are printed as a table.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from puzzle_jax.data import datasets
from puzzle_jax.evaluation import miou, report
from puzzle_jax.pipeline import Workdir
from puzzle_jax.viz import gallery


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    source, info = datasets.load_split_from_config(config.data, config.infer.split)
    cam_dir = workdir.cam_dir()
    class_names = ["background"] + list(info.class_names)
    sweep = miou.ThresholdSweep(len(class_names), miou.threshold_range(*config.eval.threshold_range))
    missing = []
    for index in tqdm(range(len(source)), desc="eval_cam", disable=jax.process_index() != 0):
        record = source[index]
        path = os.path.join(cam_dir, f"{record['id']}.npz")
        if not os.path.exists(path):
            missing.append(path)
            continue
        with np.load(path) as cams:
            sweep.update(cams["hr_cam"], cams["keys"], record["mask"])
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(source)} CAM files are missing (first: {missing[0]}); run infer_cam first."
        )
    result = sweep.result()
    per_class = report.ious_for_json(result["per_class_iou"])
    print(report.format_sweep_table(class_names, result), flush=True)
    gallery_path = None
    if config.eval.gallery_images > 0 and jax.process_index() == 0:
        gallery_path = _write_gallery(config, workdir, source, info.class_names, result["best_threshold"])
        print(f"CAM gallery (worst image first): {gallery_path}", flush=True)
    return {
        "miou": result["miou"],
        "best_threshold": result["best_threshold"],
        "per_class_iou": dict(zip(class_names, per_class)),
        "per_threshold_miou": dict(zip(map(str, result["thresholds"]), result["per_threshold_miou"])),
        "num_images": result["num_images"],
        "split": config.infer.split,
        "gallery": gallery_path,
    }


def _write_gallery(config, workdir: Workdir, source, class_names, threshold: float) -> str:
    """Pictures of ``eval.gallery_images`` images spread over the split, beside another run's CAMs if asked."""
    count = min(int(config.eval.gallery_images), len(source))
    indices = np.linspace(0, len(source) - 1, count).round().astype(int)
    compare_dir = None
    if config.eval.compare_workdir:
        compare_dir = Workdir(config.eval.compare_workdir).cam_dir()
        if not os.path.isdir(compare_dir):
            raise FileNotFoundError(f"eval.compare_workdir: {compare_dir} does not exist (run infer_cam there first).")
    entries = []
    for index in indices:
        record = source[int(index)]
        with np.load(os.path.join(workdir.cam_dir(), f"{record['id']}.npz")) as cams:
            entry = {
                "id": record["id"],
                "image": record["image"],
                "ground_truth": record["mask"],
                "cams": cams["hr_cam"],
                "keys": cams["keys"],
                "threshold": threshold,
            }
        if compare_dir is not None:
            with np.load(os.path.join(compare_dir, f"{record['id']}.npz")) as other:
                entry.update(compare_cams=other["hr_cam"], compare_keys=other["keys"])
        entries.append(entry)
    return gallery.write_gallery(
        os.path.join(workdir.stage_dir("eval_cam"), "gallery"),
        entries,
        class_names=class_names,
        title=f"CAMs of {workdir.root} ({config.infer.split}, threshold {threshold:.2f})",
        compare_name=os.path.basename(os.path.normpath(config.eval.compare_workdir)) if compare_dir else None,
        run_name=os.path.basename(workdir.root),
    )
