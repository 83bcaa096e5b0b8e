"""The CAM classifier's training task: classification alone (``pretrain``) or the Puzzle-CAM objective
(``train_cam``, spec §3).

Both build a classifier (``models.classifier_config``) from ``config.model``, read images and image-level labels
only (the masks are not decoded), and train on the loader's uint8 crops (``input_pipeline.ClassifierAugmentation``).
``init_from`` copies the backbone, and the 1x1 head too when the section's ``init_head`` is set (an exported model
with the same classes).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from puzzle_jax import losses, models, puzzle, training
from puzzle_jax.data import datasets, input_pipeline
from puzzle_jax.tasks import base

OBJECTIVES = ("classification", "puzzle")
CAM_LEVELS = ("feature", "cam")


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

    def load_split(self, data_config, split):
        # Image-level labels only: the masks are not decoded.
        return datasets.load_split_from_config(data_config, split, decode_masks=False)

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
            return create_classification_objective()
        return create_puzzle_objective(self.cam_section, total_steps, int(self.model_section.output_stride))

    def create_transform(self, section):
        return input_pipeline.ClassifierAugmentation(
            crop_size=section.crop_size, rescale_range=tuple(section.rescale_range)
        )


def _loss_precision(array: jax.Array) -> jax.Array:
    """The losses' precision: float32 for bfloat16 (or float32) model outputs; a float64 model's (the float64 parity
    tests of the training step, under ``jax.enable_x64``) stay float64."""
    return array.astype(jnp.promote_types(array.dtype, jnp.float32))


def create_classification_objective() -> training.LossFunction:
    """Plain multi-label classification on the full images (the ``pretrain`` stage)."""

    def compute_loss(model, batch, step):
        del step
        logits, _ = model(base.batch_images(batch))
        class_loss = losses.multilabel_soft_margin_loss(_loss_precision(logits), batch["labels"])
        return class_loss, {"class_loss": class_loss}

    return compute_loss


def create_puzzle_objective(cam: Any, total_steps: int, output_stride: int) -> training.LossFunction:
    """The Puzzle-CAM objective of spec §3 for ``config.cam``.

    ``loss = class_loss + [p_class_loss] + [alpha_t * re_loss]``. The tiled pass runs only when a puzzle term is on,
    so ``cl`` is the plain-CAM baseline. Images whose side is not a multiple of grid x output stride are padded with
    zeros (the mean colour after normalisation) instead of being rejected.
    """
    use_puzzle_class, use_reconstruction = losses.parse_loss_option(cam.loss_option)
    if cam.level not in CAM_LEVELS:
        raise ValueError(f"cam.level={cam.level!r}; allowed values are {list(CAM_LEVELS)}.")
    grid = int(cam.grid)

    def compute_loss(model, batch, step):
        labels = batch["labels"]
        images, _ = puzzle.pad_to_multiple(base.batch_images(batch), grid * output_stride)
        logits, class_maps = model(images)
        class_maps = _loss_precision(class_maps)
        class_loss = losses.multilabel_soft_margin_loss(_loss_precision(logits), labels)
        metrics = {"class_loss": class_loss}
        loss = class_loss
        if use_puzzle_class or use_reconstruction:
            _, tile_maps = model(puzzle.tile(images, grid))
            merged_maps = puzzle.merge(_loss_precision(tile_maps), grid)
            if use_puzzle_class:
                puzzle_class_loss = losses.multilabel_soft_margin_loss(merged_maps.mean(axis=(1, 2)), labels)
                loss = loss + puzzle_class_loss
                metrics["puzzle_class_loss"] = puzzle_class_loss
            if use_reconstruction:
                full, merged = class_maps, merged_maps
                if cam.level == "cam":
                    full, merged = losses.make_cam(full), losses.make_cam(merged)
                reconstruction = losses.reconstruction_loss(
                    full, merged, labels, norm=cam.re_loss, option=cam.re_loss_option
                )
                alpha = losses.alpha_at_step(step, total_steps, cam.alpha, cam.alpha_schedule)
                loss = loss + alpha * reconstruction
                metrics.update(reconstruction_loss=reconstruction, alpha=alpha)
        return loss, metrics

    return compute_loss
