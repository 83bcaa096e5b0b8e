"""Stage ``train_cam``: Puzzle-CAM classifier training (spec §3-4), exported to ``train_cam/model``.

The backbone starts from ``config.train_cam.init_from`` (converted ImageNet weights, or ``"pretrain"``: this
workdir's ``pretrain/model``). With ``config.cam.loss_option = "cl"`` this is the plain-CAM baseline.
"""

from __future__ import annotations

import ml_collections

from puzzle_jax import driver
from puzzle_jax.pipeline import Workdir
from puzzle_jax.tasks.classifier import ClassifierTask


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    task = ClassifierTask(config.model, objective="puzzle", cam_section=config.cam)
    init_from = workdir.resolve_init_from(config.train_cam.init_from)
    summary = driver.train_and_export(
        task, config, "train_cam", workdir.training("train_cam"), init_from=init_from, seed=config.seed
    )
    return {**summary, "loss_option": config.cam.loss_option, "init_from": init_from}
