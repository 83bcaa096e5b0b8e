"""Stage ``pseudo_labels``: the pseudo labels of ``config.infer.split`` from ``infer_rw``'s random walk (spec §8).

Reads ``infer_rw/rw/<id>.npz`` (``rw``) and the split's images; writes ``pseudo_labels/labels/<id>.png``: a background
channel at ``refine.rw_threshold``, argmax, ``refine.pseudo_crf_iterations`` CRF steps, class ids
(``refine.cam_labels.pseudo_labels``). The CRF runs in ``refine.workers`` processes, or as Ray tasks
(``refine.backend``); existing PNGs are skipped, so an interrupted run resumes. The finished folder is scored against
the masks of ``config.eval.split``'s images (default: ``infer.split``): mIoU with pixels predicted as 255
counted as wrong (VOC devkit) and ignored (ToCo), and the authors' FP / FN; with the summaries of ``eval_cam`` and
``infer_rw``, the chain CAM -> random walk -> + dCRF (the paper's Table 2) is printed and summarised as ``chain``.
``pseudo_labels/gallery/index.html`` draws ``eval.gallery_images`` images with each step of the chain beside the ground
truth (CAM labels at ``eval_cam``'s best threshold, else at ``refine.aff_fg_threshold``), worst pseudo labels first.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import ml_collections

from puzzle_jax import per_image, sharding
from puzzle_jax.data import datasets
from puzzle_jax.evaluation import report
from puzzle_jax.pipeline import Workdir, scored_split
from puzzle_jax.refine import cam_labels, label_folders
from puzzle_jax.viz import gallery


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    refine = config.refine
    # Images only: the masks are read where the labels are scored.
    source, info = datasets.load_split_from_config(
        config.data, config.infer.split, decode_masks=False, field="infer.split"
    )
    label_dir = workdir.pseudo_label_dir()
    counts = label_folders.write_label_folder(
        source,
        score_dir=workdir.random_walk_dir(),
        label_dir=label_dir,
        function=functools.partial(
            cam_labels.pseudo_labels_from_file, threshold=refine.rw_threshold, iterations=refine.pseudo_crf_iterations
        ),
        backend=per_image.HostBackend.from_config(refine),
        produced_by="infer_rw",
        description="pseudo_labels",
    )
    # Every process's share must be written before the folder is scored.
    sharding.wait_for_all_processes("puzzle_jax pseudo_labels written")
    scored_records, _ = datasets.load_split_from_config(config.data, scored_split(config), field="eval.split")
    scores = label_folders.score_label_folder(
        scored_records,
        label_dir=label_dir,
        score_dir=workdir.random_walk_dir(),
        num_classes=info.num_classes + 1,
        show_progress=jax.process_index() == 0,
        description="pseudo_labels scores",
    )
    summary = {
        "label_dir": label_dir,
        **counts,
        "split": config.infer.split,
        "scored_split": scored_split(config),
        "images_without_foreground": scores["images_without_foreground"],
        "threshold": refine.rw_threshold,
        "crf_iterations": refine.pseudo_crf_iterations,
    }
    scored = scores["confusion"].sum() > 0
    if scored:
        summary.update(report.label_summary(scores["confusion"], scores["images"]))
    else:
        summary["num_images"] = scores["images"]
    if jax.process_index() == 0:
        class_names = ["background", *info.class_names]
        table = (
            report.format_label_table(class_names, summary, title="Pseudo-label mIoU")
            if scored
            else f"Pseudo labels: {scores['images']} images; no ground truth in this split: nothing scored"
        )
        print(table, flush=True)
        print(f"{scores['images_without_foreground']} image(s) without a foreground class (all background)")
    if scored:
        summary["chain"] = report.refinement_chain(
            workdir.read_summary("eval_cam"),
            workdir.read_summary("infer_rw"),
            summary,
            rw_threshold=refine.rw_threshold,
        )
        if jax.process_index() == 0:
            print(report.format_chain_table(summary["chain"]), flush=True)
    summary["gallery"] = None
    if config.eval.gallery_images > 0 and jax.process_index() == 0:
        summary["gallery"] = _write_gallery(config, workdir, scored_records, info.class_names)
        print(f"Refinement chain gallery (worst pseudo labels first): {summary['gallery']}", flush=True)
    return summary


def _write_gallery(
    config: ml_collections.ConfigDict, workdir: Workdir, source: Sequence[dict], class_names: Sequence[str]
) -> str:
    cam_summary = workdir.read_summary("eval_cam")
    # Without eval_cam's best threshold, the affinity labels' confident-foreground one is the CAM threshold at hand.
    cam_threshold = cam_summary["best_threshold"] if cam_summary else config.refine.aff_fg_threshold
    return gallery.write_chain_gallery(
        workdir.gallery_dir("pseudo_labels"),
        source,
        count=config.eval.gallery_images,
        class_names=class_names,
        cam_dir=workdir.cam_dir(),
        cam_threshold=cam_threshold,
        affinity_label_dir=workdir.affinity_label_dir(),
        random_walk_dir=workdir.random_walk_dir(),
        rw_threshold=config.refine.rw_threshold,
        pseudo_label_dir=workdir.pseudo_label_dir(),
        title=f"Refinement chain of {workdir.root} ({scored_split(config)})",
    )
