"""Stage ``train_cam``: Puzzle-CAM classifier training (spec §3-4), exported to ``train_cam/model``.

The backbone starts from ``config.model.init_from``; the special value ``"pretrain"`` means this workdir's
``pretrain/model`` export. With ``config.cam.loss_option = "cl"`` this is the plain-CAM baseline.
"""

from __future__ import annotations

import ml_collections

from puzzle_jax import classifier_training
from puzzle_jax.pipeline import Workdir


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    init_from = config.model.init_from
    if init_from == "pretrain":
        init_from = workdir.exported_model("pretrain")
    summary = classifier_training.train_classifier(
        config,
        workdir.stage_dir("train_cam"),
        split=config.data.train_split,
        batch_size=config.train.batch_size,
        epochs=config.train.epochs,
        learning_rate=config.train.learning_rate,
        objective="puzzle",
        init_from=init_from,
        seed=config.seed,
    )
    summary.update(loss_option=config.cam.loss_option, init_from=init_from)
    return summary
