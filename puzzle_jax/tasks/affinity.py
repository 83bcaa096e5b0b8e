"""AffinityNet's training task (spec §8; the ``train_aff`` stage): the edge branches on a frozen backbone, trained
on the affinity labels an earlier stage wrote.

The records are the split's images joined with the label folder of ``aff_labels`` (``datasets.LabelFolderRecords``:
a missing folder or label file is an error naming it); the transform crops image and labels together and reduces
the labels to the network's stride-4 grid (``input_pipeline.AffinityAugmentation``); the objective is
``objectives.create_affinity_objective``; only the edge layers are optimised
(``optim.create_frozen_backbone_optimizer``: the authors' single group). ``init_from`` copies the backbone
(ImageNet weights in the authors' recipe, not the Puzzle-CAM classifier). The authors validate nothing; ``assess``
warns when a loss term did not fall.
"""

from __future__ import annotations

import json
import os
from typing import Any

from puzzle_jax import models, objectives, optim, training
from puzzle_jax.data import datasets, input_pipeline
from puzzle_jax.tasks import base

# The label maps are reduced to the edge map's grid (AffinityNet's output stride).
LABEL_STRIDE = 4
# The loss terms ``assess`` expects to fall between the first and the last tenth of training: the authors' two halves
# of the loss. (The bg and fg parts of the positive term trade against each other early on, so one of them alone
# may rise in a run that learns.)
ASSESSED_TERMS = ("positive_loss", "negative_loss")


class AffinityTask(base.Task):
    """AffinityNet trained on affinity labels.

    Args:
      model_section: ``config.model`` (architecture and compute dtype; the BatchNorm mode, output stride and remat are
        the model's own: frozen, 16, off).
      label_dir: the folder of ``<id>.png`` affinity labels (``Workdir.affinity_label_dir()``).
      radius: the search radius of the pairs (the authors' 10).
      metrics_path: the training's metrics file (``TrainingPaths.metrics``), which ``assess`` reads for the loss terms
        of the first tenth of training; None skips that check.
    """

    def __init__(self, model_section: Any, label_dir: str, radius: int, *, metrics_path: str | None = None):
        self.model_section = model_section
        self.label_dir = label_dir
        self.radius = int(radius)
        self.metrics_path = metrics_path

    def load_split(self, data_config, split, field):
        # The split's masks are not decoded: the labels come from the folder.
        records, info = datasets.load_split_from_config(data_config, split, decode_masks=False, field=field)
        joined = datasets.LabelFolderRecords(
            records, self.label_dir, info.num_classes, produced_by="the aff_labels stage"
        )
        return joined, info

    def model_config(self, split_info) -> dict[str, Any]:
        del split_info  # one edge logit, whatever the classes
        return models.affinity_config(arch=self.model_section.arch, dtype=self.model_section.dtype)

    def init_parts(self, section) -> tuple[str, ...]:
        del section
        return ("model",)

    def create_optimizer(self, params, section, total_steps: int):
        settings = base.optimizer_settings(section)
        return optim.create_frozen_backbone_optimizer(params, total_steps=total_steps, **settings)

    def create_objective(self, section, total_steps: int) -> training.LossFunction:
        del section, total_steps
        return objectives.create_affinity_objective(self.radius)

    def create_transform(self, section):
        # The pairs start in columns [r-1, w-r+1) of the crop's label grid: it needs 2r-1 columns at least.
        grid = section.crop_size // LABEL_STRIDE
        if grid < 2 * self.radius - 1:
            raise ValueError(
                f"train_aff.crop_size={section.crop_size} gives a {grid}x{grid} label grid, too small for pairs of "
                f"radius {self.radius} (at least {2 * self.radius - 1} cells): raise the crop size to "
                f"{LABEL_STRIDE * (2 * self.radius - 1)} or more, or lower train_aff.radius."
            )
        return input_pipeline.AffinityAugmentation(
            crop_size=section.crop_size, rescale_range=tuple(section.rescale_range), label_stride=LABEL_STRIDE
        )

    def assess(self, model, summary, train_records, validation_records):
        """The loss terms of the first and the last tenth of training, and a warning for each one that did not
        fall (the authors validate nothing; a term that stays flat means the edge branches learned nothing from
        it). A validation split is not scored: affinity labels exist only for the split ``aff_labels`` labelled."""
        del model, train_records, validation_records
        assessment: dict[str, Any] = {"warnings": []}
        last = summary.get("last_tenth_metrics", {})
        first = _first_tenth_metrics(self.metrics_path, summary.get("total_steps", 0))
        if not first or not last:
            return assessment
        assessment["first_tenth_metrics"] = first
        for term in ASSESSED_TERMS:
            if term not in first or term not in last:
                continue
            # A term without any pair in the first tenth (no foreground in the labels) is 0 and says nothing.
            if first[term] > 0 and last[term] >= first[term]:
                assessment["warnings"].append(
                    f"the {term} did not fall: {first[term]:.4f} over the first tenth of training, {last[term]:.4f} "
                    "over the last. Check the learning rate, the number of epochs and the affinity labels."
                )
        return assessment


def _first_tenth_metrics(metrics_path: str | None, total_steps: int) -> dict[str, float]:
    """Mean metrics of the steps in the first tenth of training, from the metrics file (process 0 writes it;
    elsewhere, or without it, nothing)."""
    if not metrics_path or not os.path.exists(metrics_path) or total_steps <= 0:
        return {}
    cutoff = max(1, -(-total_steps // 10))
    records = {}
    with open(metrics_path) as lines:
        for line in lines:
            record = json.loads(line)
            # A resumed run may log a step twice: the last record of a step wins.
            if record["step"] <= cutoff:
                records[record["step"]] = record
    if not records:
        return {}
    names = set.intersection(*(set(record) for record in records.values())) - {"step"}
    return {name: sum(record[name] for record in records.values()) / len(records) for name in sorted(names)}
