"""Stage ``pretrain``: classification-only training of the whole classifier on ``config.pretrain.split``.

The paper starts from ImageNet weights, which cannot be downloaded in every setting (and mean nothing for the
built-in demo set). This stage produces the stand-in: a classifier trained with the class loss alone on images
disjoint from the CAM training split. ``train_cam`` then initialises its backbone from ``pretrain/model``, exactly
as it would from converted ImageNet weights (``config.model.init_from``).
"""

from __future__ import annotations

import ml_collections

from puzzle_jax import classifier_training
from puzzle_jax.pipeline import Workdir


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    return classifier_training.train_classifier(
        config,
        workdir.stage_dir("pretrain"),
        split=config.pretrain.split,
        batch_size=config.pretrain.batch_size,
        epochs=config.pretrain.epochs,
        learning_rate=config.pretrain.learning_rate,
        objective="classification",
        init_from="",
        seed=config.seed + 1000,  # Independent of the CAM run's seed, so seeds of train_cam share one pretrain.
    )
