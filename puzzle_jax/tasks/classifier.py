"""The CAM classifier's training task: classification alone (``pretrain``) or the Puzzle-CAM objective
(``train_cam``, spec §3), both from ``objectives``.

Both build a classifier (``models.classifier_config``) from ``config.model``, read images and image-level labels
only (the masks are not decoded), and train on the loader's uint8 crops (``input_pipeline.ClassifierAugmentation``).
``init_from`` copies the backbone, and the 1x1 head too when the section's ``init_head`` is set (an exported model
with the same classes).
"""

from __future__ import annotations

from typing import Any

from puzzle_jax import models, objectives, training
from puzzle_jax.data import datasets, input_pipeline
from puzzle_jax.tasks import base

OBJECTIVES = ("classification", "puzzle")


class ClassifierTask(base.Task):
    """A classifier trained on image-level labels.

    Args:
      model_section: ``config.model`` (architecture, output stride, BatchNorm mode, dtype, remat).
      objective: ``"classification"`` (the class loss alone) or ``"puzzle"`` (``create_puzzle_objective``).
      cam_section: ``config.cam``, the Puzzle-CAM settings; required for ``"puzzle"``.
    """

    def __init__(self, model_section: Any, *, objective: str, cam_section: Any = None):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}; allowed values are {list(OBJECTIVES)}.")
        if objective == "puzzle" and cam_section is None:
            raise ValueError("The puzzle objective needs the config's cam section.")
        remat = model_section.remat
        if not (isinstance(remat, bool) or remat == "auto"):
            raise ValueError(f"model.remat={remat!r}; allowed values are [True, False, 'auto'].")
        self.model_section = model_section
        self.objective = objective
        self.cam_section = cam_section
        self.remat_auto = remat == "auto"

    def load_split(self, data_config, split, field):
        # Image-level labels only: the masks are not decoded.
        return datasets.load_split_from_config(data_config, split, decode_masks=False, field=field)

    def model_config(self, split_info) -> dict[str, Any]:
        section = self.model_section
        return models.classifier_config(
            arch=section.arch,
            num_classes=split_info.num_classes,
            output_stride=section.output_stride,
            bn_mode=section.bn_mode,
            bn_group_size=section.bn_group_size,
            dtype=section.dtype,
            # "auto" starts without remat; the driver decides and records the decision.
            remat=section.remat is True,
        )

    def init_parts(self, section) -> tuple[str, ...]:
        return ("model", "classifier") if section.init_head else ("model",)

    def create_objective(self, section, total_steps: int) -> training.LossFunction:
        del section
        if self.objective == "classification":
            return objectives.create_classification_objective()
        return objectives.create_puzzle_objective(
            self.cam_section, total_steps, int(self.model_section.output_stride)
        )

    def create_transform(self, section):
        return input_pipeline.ClassifierAugmentation(
            crop_size=section.crop_size, rescale_range=tuple(section.rescale_range)
        )
