"""Stage ``infer_seg``: the segmenter's labels of ``config.seg.split`` (spec §9, inference), one label PNG per image.

Reads ``train_seg/model``; writes ``infer_seg/<split>/<id>.png`` (VOC palette): scales ``seg.scales`` each with its
flip (``seg.flip``), logits summed at the image's size, softmax, then the dense CRF (``seg.crf_iterations`` steps, in
``seg.workers`` host processes, or as Ray tasks with ``refine.backend="ray"``) or the argmax
(``seg.crf_iterations=0``). Files are written atomically and existing ones skipped, so an interrupted run resumes;
processes split the images. For VOC 2012's test split the predictions are also laid out for the evaluation server
(``Workdir.voc_test_submission_dir``) with a ``results.tar.gz`` to upload.
"""

from __future__ import annotations

import os
import shutil
import tarfile

import jax
import ml_collections

from puzzle_jax import checkpointing, fileio, per_image, seg_inference, sharding
from puzzle_jax.data import datasets
from puzzle_jax.pipeline import Workdir

# The evaluation server's folder for segmentation results trained with data beyond VOC (ImageNet weights).
VOC_SERVER_FOLDER = os.path.join("results", "VOC2012", "Segmentation", "comp6_test_cls")


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    model, _ = checkpointing.load_exported(workdir.exported_model("train_seg"), family="segmentation")
    seg = config.seg
    source, _ = datasets.load_split_from_config(config.data, seg.split, decode_masks=False, field="seg.split")
    output_dir = workdir.segmentation_dir(seg.split)
    counts = seg_inference.write_segmentation(
        model,
        source,
        output_dir,
        scales=tuple(seg.scales),
        flip=bool(seg.flip),
        crf_iterations=int(seg.crf_iterations),
        # The CRF runs where refine.backend says; a local pool has seg.workers processes.
        backend=per_image.HostBackend.from_config(config.refine, workers=int(seg.workers)),
        infer=config.infer,
        num_devices=config.mesh.num_devices,
    )
    sharding.wait_for_all_processes("puzzle_jax infer_seg written")
    summary = {
        "prediction_dir": output_dir,
        **counts,
        "split": seg.split,
        "scales": list(seg.scales),
        "flip": bool(seg.flip),
        "crf_iterations": int(seg.crf_iterations),
    }
    if config.data.dataset == "voc2012_aug" and seg.split == "test" and jax.process_index() == 0:
        summary["voc_test_submission"] = write_voc_submission(output_dir, workdir.voc_test_submission_dir())
        print(f"[infer_seg] VOC 2012 test submission: {summary['voc_test_submission']}", flush=True)
    return summary


def write_voc_submission(prediction_dir: str, submission_dir: str) -> str:
    """Lays out ``prediction_dir``'s PNGs as the VOC evaluation server expects and archives them; returns the
    archive's path (``<submission_dir>/results.tar.gz``), written atomically."""
    folder = os.path.join(submission_dir, VOC_SERVER_FOLDER)
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(prediction_dir)):
        if name.endswith(".png") and not os.path.exists(os.path.join(folder, name)):
            shutil.copyfile(os.path.join(prediction_dir, name), os.path.join(folder, name))
    archive = os.path.join(submission_dir, "results.tar.gz")
    with fileio.atomic_path(archive) as temporary, tarfile.open(temporary, "w:gz") as tar:
        tar.add(os.path.join(submission_dir, "results"), arcname="results")
    return archive
