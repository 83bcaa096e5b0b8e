"""Stage ``aff_labels``: the affinity labels of ``config.infer.split`` from ``infer_cam``'s CAMs (spec §7).

Reads ``infer_cam/cams/<id>.npz`` (``hr_cam``) and the split's images; writes ``aff_labels/labels/<id>.png``: class
ids where the CAMs are confident (foreground above ``refine.aff_fg_threshold``, background below
``refine.aff_bg_threshold``, each refined by ``refine.aff_crf_iterations`` CRF steps), 255 between
(``refine.cam_labels.affinity_labels``). The CRF runs in ``refine.workers`` processes, or as Ray tasks
(``refine.backend``); existing PNGs are skipped, so an interrupted run resumes. The finished folder is scored against
the masks of ``config.eval.split``'s images (default: ``infer.split``): precision of the confident
pixels, recall, per class, the share of 255 and the images without a foreground class.
"""

from __future__ import annotations

import functools

import jax
import ml_collections

from puzzle_jax import per_image, sharding
from puzzle_jax.data import datasets
from puzzle_jax.pipeline import Workdir, scored_split
from puzzle_jax.refine import cam_labels, label_folders


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    refine = config.refine
    # Images only: the masks are read where the labels are scored.
    source, info = datasets.load_split_from_config(
        config.data, config.infer.split, decode_masks=False, field="infer.split"
    )
    label_dir = workdir.affinity_label_dir()
    counts = label_folders.write_label_folder(
        source,
        score_dir=workdir.cam_dir(),
        label_dir=label_dir,
        function=functools.partial(
            cam_labels.affinity_labels_from_file,
            fg_threshold=refine.aff_fg_threshold,
            bg_threshold=refine.aff_bg_threshold,
            iterations=refine.aff_crf_iterations,
        ),
        backend=per_image.HostBackend.from_config(refine),
        produced_by="infer_cam",
        description="aff_labels",
    )
    # Every process's share must be written before the folder is scored.
    sharding.wait_for_all_processes("puzzle_jax aff_labels written")
    scored, _ = datasets.load_split_from_config(config.data, scored_split(config), field="eval.split")
    scores = label_folders.score_label_folder(
        scored,
        label_dir=label_dir,
        score_dir=workdir.cam_dir(),
        num_classes=info.num_classes + 1,
        show_progress=jax.process_index() == 0,
        description="aff_labels scores",
    )
    class_names = ["background", *info.class_names]
    quality = label_folders.precision_recall(scores["confusion"])
    void_share = scores["void_pixels"] / max(scores["pixels"], 1)
    if jax.process_index() == 0:
        print(_format_table(class_names, quality, void_share, scores), flush=True)
    return {
        "label_dir": label_dir,
        **counts,
        "split": config.infer.split,
        "scored_split": scored_split(config),
        "images": scores["images"],
        "images_without_foreground": scores["images_without_foreground"],
        "void_share": void_share,
        **quality,
        "fg_threshold": refine.aff_fg_threshold,
        "bg_threshold": refine.aff_bg_threshold,
        "crf_iterations": refine.aff_crf_iterations,
    }


def _format_table(class_names, quality, void_share, scores) -> str:
    def shown(value):
        return "  n/a" if value is None else f"{100 * value:5.1f}"

    lines = [
        f"Affinity labels: {scores['images']} images, {100 * void_share:.1f}% of pixels uncertain (255), "
        f"{scores['images_without_foreground']} image(s) without a foreground class"
    ]
    if quality["precision"] is None:
        lines.append("no ground truth in this split: nothing scored")
        return "\n".join(lines)
    lines.append(f"{'class':<16}precision  recall (%, GT 255 ignored; recall counts 255 as missed)")
    for name, precision, recall in zip(class_names, quality["per_class_precision"], quality["per_class_recall"]):
        lines.append(f"{name:<16}{shown(precision):>9}  {shown(recall):>6}")
    lines.append(f"{'all pixels':<16}{shown(quality['precision']):>9}  {shown(quality['recall']):>6}")
    return "\n".join(lines)
