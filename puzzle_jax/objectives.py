"""Training objectives: what each model family minimises, as ``compute_loss(model, batch, step) -> (loss, metrics)``
for ``training.make_train_step``.

Pure functions of a model and a batch of global arrays (inside the jitted step): no data loading, so the benchmarks
and tests build the exact step the stages train with. The tasks (``puzzle_jax.tasks``) choose and configure them.

* ``batch_images``: the normalised images of a loader batch (uint8 crops + boxes, normalised on the device).
* ``create_classification_objective``: multi-label classification (the ``pretrain`` stage).
* ``create_puzzle_objective``: Puzzle-CAM (spec §3; the ``train_cam`` stage).
* ``affinity_loss`` / ``create_affinity_objective``: AffinityNet's pair loss on path-max affinities (spec §8; the
  ``train_aff`` stage).
* ``create_segmentation_objective``: DeepLab's pixel cross-entropy at full resolution, 255 ignored (spec §9; the
  ``train_seg`` stage).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from puzzle_jax import losses, puzzle, training
from puzzle_jax.data import transforms
from puzzle_jax.labels import IGNORE_LABEL
from puzzle_jax.refine import paths

CAM_LEVELS = ("feature", "cam")
# The authors' epsilon inside the affinity loss's logarithms and added to its pair counts (an empty class of pairs
# contributes 0, not NaN).
AFFINITY_EPSILON = 1e-5


def batch_images(batch: dict[str, jax.Array]) -> jax.Array:
    """The normalised float32 images of a training batch, inside the jitted step.

    The train loader sends uint8 crops with the box of the image on each (``input_pipeline``), normalised here on
    the device (``transforms.normalize_crops``); floating-point images are taken as already normalised.
    """
    images = batch["image"]
    if images.dtype == jnp.uint8:
        if "image_box" not in batch:
            raise ValueError(
                "A batch of uint8 images needs 'image_box' (top, left, height, width of each image on its crop), "
                "as the train loader produces; give normalised float images otherwise."
            )
        return transforms.normalize_crops(images, batch["image_box"])
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"batch['image'] has dtype {images.dtype}; expected uint8 crops or normalised floats.")
    return images


def _loss_precision(array: jax.Array) -> jax.Array:
    """The losses' precision: float32 for bfloat16 (or float32) model outputs; a float64 model's (the float64 parity
    tests of the training step, under ``jax.enable_x64``) stay float64."""
    return array.astype(jnp.promote_types(array.dtype, jnp.float32))


def create_classification_objective() -> training.LossFunction:
    """Plain multi-label classification on the full images (the ``pretrain`` stage)."""

    def compute_loss(model, batch, step):
        del step
        logits, _ = model(batch_images(batch))
        class_loss = losses.multilabel_soft_margin_loss(_loss_precision(logits), batch["labels"])
        return class_loss, {"class_loss": class_loss}

    return compute_loss


def create_puzzle_objective(cam: Any, total_steps: int, output_stride: int) -> training.LossFunction:
    """The Puzzle-CAM objective of spec §3 for ``config.cam``.

    ``loss = class_loss + [p_class_loss] + [alpha_t * re_loss]``. The tiled pass runs only when a puzzle term is on,
    so ``cl`` is the plain-CAM baseline. With ``cam.level="cam"`` the full and the merged maps are normalised
    (``losses.make_cam``) before both puzzle terms, the puzzle class loss included, as the authors' code does. Images
    whose side is not a multiple of grid x output stride are padded with zeros (the mean colour after normalisation)
    instead of being rejected.
    """
    use_puzzle_class, use_reconstruction = losses.parse_loss_option(cam.loss_option)
    if cam.level not in CAM_LEVELS:
        raise ValueError(f"cam.level={cam.level!r}; allowed values are {list(CAM_LEVELS)}.")
    grid = int(cam.grid)

    def compute_loss(model, batch, step):
        labels = batch["labels"]
        images, _ = puzzle.pad_to_multiple(batch_images(batch), grid * output_stride)
        logits, class_maps = model(images)
        class_maps = _loss_precision(class_maps)
        class_loss = losses.multilabel_soft_margin_loss(_loss_precision(logits), labels)
        metrics = {"class_loss": class_loss}
        loss = class_loss
        if use_puzzle_class or use_reconstruction:
            _, tile_maps = model(puzzle.tile(images, grid))
            merged_maps = puzzle.merge(_loss_precision(tile_maps), grid)
            if cam.level == "cam":
                # As the authors: both puzzle terms see the normalised maps, the puzzle class loss too.
                class_maps, merged_maps = losses.make_cam(class_maps), losses.make_cam(merged_maps)
            if use_puzzle_class:
                puzzle_class_loss = losses.multilabel_soft_margin_loss(merged_maps.mean(axis=(1, 2)), labels)
                loss = loss + puzzle_class_loss
                metrics["puzzle_class_loss"] = puzzle_class_loss
            if use_reconstruction:
                reconstruction = losses.reconstruction_loss(
                    class_maps, merged_maps, labels, norm=cam.re_loss, option=cam.re_loss_option
                )
                alpha = losses.alpha_at_step(step, total_steps, cam.alpha, cam.alpha_schedule)
                loss = loss + alpha * reconstruction
                metrics.update(reconstruction_loss=reconstruction, alpha=alpha)
        return loss, metrics

    return compute_loss


def affinity_loss(
    affinities: jax.Array, bg_positive: jax.Array, fg_positive: jax.Array, negative: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The authors' AffinityNet loss (spec §8) on affinities and pair masks of any one shape (summed over the batch).

    ``pos = -log(aff + eps)`` averaged over the background pairs and over the foreground pairs separately (each sum
    divided by its pair count + eps) and combined as 1/2 bg + 1/2 fg; ``neg = -log(1 + eps - aff)`` averaged over
    the negative pairs the same way; total ``1/2 (pos + neg)``.

    Returns:
      ``(loss, metrics)``: the metrics are the three terms (``bg_positive_loss``, ``fg_positive_loss``,
      ``negative_loss``), the combined ``positive_loss`` and the pair counts of the batch (``*_pairs``).
    """
    affinities = _loss_precision(affinities)
    positive = -jnp.log(affinities + AFFINITY_EPSILON)
    negative_term = -jnp.log(1.0 + AFFINITY_EPSILON - affinities)
    counts = {
        name: jnp.sum(mask.astype(affinities.dtype))
        for name, mask in (("bg_positive", bg_positive), ("fg_positive", fg_positive), ("negative", negative))
    }

    def mean_over(mask, values, count):
        return jnp.sum(jnp.where(mask, values, 0.0)) / (count + AFFINITY_EPSILON)

    bg_loss = mean_over(bg_positive, positive, counts["bg_positive"])
    fg_loss = mean_over(fg_positive, positive, counts["fg_positive"])
    negative_loss = mean_over(negative, negative_term, counts["negative"])
    positive_loss = bg_loss / 2 + fg_loss / 2
    loss = (positive_loss + negative_loss) / 2
    metrics = {
        "positive_loss": positive_loss,
        "bg_positive_loss": bg_loss,
        "fg_positive_loss": fg_loss,
        "negative_loss": negative_loss,
        **{f"{name}_pairs": count for name, count in counts.items()},
    }
    return loss, metrics


def create_affinity_objective(radius: int = 10) -> training.LossFunction:
    """AffinityNet's objective (spec §8): edge = sigmoid(model logits), affinities = one minus the largest edge
    value on the path of every pair within ``radius`` (``paths.path_max_affinity``), the pairs labelled from the
    batch's stride-4 label maps ``batch["mask"]`` (``paths.pair_labels``: 255 ends are ignored), then
    ``affinity_loss``."""

    def compute_loss(model, batch, step):
        del step
        logits = _loss_precision(model(batch_images(batch)))
        label_maps = batch["mask"]
        if logits.shape != label_maps.shape:
            raise ValueError(
                f"The edge map {tuple(logits.shape)} and the label maps {tuple(label_maps.shape)} differ: the labels "
                "must be reduced to the network's stride-4 grid (input_pipeline.AffinityAugmentation)."
            )
        affinities = paths.path_max_affinity(jax.nn.sigmoid(logits), radius)
        bg_positive, fg_positive, negative = paths.pair_labels(label_maps.astype(jnp.int32), radius)
        return affinity_loss(affinities, bg_positive, fg_positive, negative)

    return compute_loss


def create_segmentation_objective(seed: int) -> training.LossFunction:
    """The segmenter's objective (spec §9): pixel cross-entropy of the full-resolution logits against the batch's
    label maps ``batch["mask"]`` (255 ignored; ``losses.pixel_cross_entropy``).

    Dropout draws its masks from ``fold_in(key(seed), step)``: a function of the step alone, so a resumed run draws
    what an uninterrupted one does, whatever the devices.
    """

    def compute_loss(model, batch, step):
        dropout_key = jax.random.fold_in(jax.random.key(seed), step)
        logits = _loss_precision(model(batch_images(batch), dropout_key=dropout_key))
        label_maps = batch["mask"]
        if logits.shape[:3] != label_maps.shape:
            raise ValueError(
                f"The logits {tuple(logits.shape)} and the label maps {tuple(label_maps.shape)} differ in size: the "
                "segmenter's logits are at the input's resolution, as the label maps of the crops."
            )
        loss, labelled = losses.pixel_cross_entropy(logits, label_maps)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == label_maps) & (label_maps != IGNORE_LABEL))
        accuracy = correct / jnp.maximum(labelled, 1)
        return loss, {"pixel_accuracy": accuracy, "labelled_fraction": labelled / label_maps.size}

    return compute_loss
