"""Stage ``train_seg``: DeepLabv3+ (spec §9) trained on label maps, exported to ``train_seg/model``.

The labels are ``config.seg.labels``: ``"pseudo_labels"`` (this workdir's ``pseudo_labels/labels/``, the weakly
supervised pipeline), ``"ground_truth"`` (the split's own masks: the fully supervised reference) or a folder of
``<id>.png`` label maps. The backbone starts from ``config.train_seg.init_from`` (ImageNet weights in the authors'
recipe; ``"pretrain"`` on the demo); the last checkpoint is exported (``tasks.segmentation`` says why not the best on
val).
"""

from __future__ import annotations

import os

import ml_collections

from puzzle_jax import driver
from puzzle_jax.pipeline import Workdir
from puzzle_jax.tasks import segmentation

# ``config.seg.labels`` values that name a source rather than a folder.
PSEUDO_LABELS = "pseudo_labels"


def label_source(labels: str, workdir: Workdir) -> tuple[str, str]:
    """``config.seg.labels`` as ``(label folder or segmentation.GROUND_TRUTH, what writes it)``."""
    if labels == PSEUDO_LABELS:
        return workdir.pseudo_label_dir(), "the pseudo_labels stage"
    if labels == segmentation.GROUND_TRUTH:
        return segmentation.GROUND_TRUTH, "the dataset"
    if not labels:
        raise ValueError(
            f"seg.labels is empty; set it to {PSEUDO_LABELS!r}, {segmentation.GROUND_TRUTH!r} or a folder of "
            "<image id>.png label maps."
        )
    return os.path.abspath(os.path.expanduser(labels)), f"you (seg.labels={labels!r})"


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    paths = workdir.training("train_seg")
    section = config.train_seg
    label_dir, produced_by = label_source(config.seg.labels, workdir)
    task = segmentation.SegmentationTask(config.model, config.seg, label_dir, produced_by=produced_by, seed=config.seed)
    init_from = workdir.resolve_init_from(section.init_from)
    if not init_from:
        print(
            "[train_seg] warning: train_seg.init_from is empty, so the backbone starts random; set it to converted "
            "ImageNet weights (weights/<arch>) or 'pretrain'.",
            flush=True,
        )
    summary = driver.train_and_export(task, config, "train_seg", paths, init_from=init_from, seed=config.seed)
    return {**summary, "labels": config.seg.labels, "label_dir": label_dir, "init_from": init_from}
