"""Stage ``pretrain``: classification-only training of the whole classifier on ``config.pretrain.split``.

The paper starts from ImageNet weights, which cannot be downloaded in every setting (and mean nothing for the
built-in demo set). This stage produces the stand-in: a classifier trained with the class loss alone on images
disjoint from the CAM training split, exported to ``pretrain/model``; ``train_cam`` then initialises its backbone
from it (``--config.train_cam.init_from=pretrain``), exactly as it would from converted ImageNet weights.
"""

from __future__ import annotations

import ml_collections

from puzzle_jax import driver
from puzzle_jax.pipeline import Workdir
from puzzle_jax.tasks.classifier import ClassifierTask


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    task = ClassifierTask(config.model, objective="classification")
    init_from = workdir.resolve_init_from(config.pretrain.init_from)
    # Seeded apart from train_cam, so that runs with other seeds of train_cam can share one pretrain export.
    seed = config.seed + 1000
    return driver.train_and_export(
        task, config, "pretrain", workdir.training("pretrain"), init_from=init_from, seed=seed
    )
