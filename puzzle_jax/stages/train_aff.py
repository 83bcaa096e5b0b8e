"""Stage ``train_aff``: AffinityNet training (spec §8) on the affinity labels of ``aff_labels``, exported to
``train_aff/model``.

The backbone starts from ``config.train_aff.init_from`` (the authors: ImageNet weights, not the Puzzle-CAM
classifier) and stays frozen; the edge branches learn from the pairs within ``config.train_aff.radius`` of the
labels in ``Workdir.affinity_label_dir()`` (a missing folder or label file is an error naming it).
"""

from __future__ import annotations

import ml_collections

from puzzle_jax import driver
from puzzle_jax.pipeline import Workdir
from puzzle_jax.tasks.affinity import AffinityTask


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    paths = workdir.training("train_aff")
    section = config.train_aff
    task = AffinityTask(config.model, workdir.affinity_label_dir(), section.radius, metrics_path=paths.metrics)
    init_from = workdir.resolve_init_from(section.init_from)
    if not init_from:
        print(
            "[train_aff] warning: train_aff.init_from is empty, so the frozen backbone stays random and only the edge "
            "layers learn; set it to converted ImageNet weights (weights/<arch>) or 'pretrain'.",
            flush=True,
        )
    summary = driver.train_and_export(task, config, "train_aff", paths, init_from=init_from, seed=config.seed)
    return {**summary, "radius": section.radius, "init_from": init_from}
