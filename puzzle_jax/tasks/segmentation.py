"""The segmenter's training task (spec §9; the ``train_seg`` stage): DeepLabv3+ trained on label maps.

The label maps are a folder of label PNGs joined with the split's images (``datasets.LabelFolderRecords``: the
pseudo labels of the ``pseudo_labels`` stage, or any folder the user names), or the split's own ground truth (the
fully supervised reference). The transform rescales, flips and crops image and labels together, the labels by
nearest neighbour and 255 outside the image (``input_pipeline.SegmentationAugmentation``); the objective is the
pixel cross-entropy at full resolution (``objectives.create_segmentation_objective``); the optimizer is the
authors' four groups (``optim``: backbone x1, its biases x2, head x10, head biases x20). ``init_from`` copies the
backbone.

The authors keep the checkpoint with the best mIoU on VOC val against ground truth: pixel labels a weakly supervised
method must not use. This task keeps the last one; ``assess`` scores ``validation_split`` against its ground truth
(one scale, no flip, no CRF) for the log only, and warns when the segmenter predicts one class everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from puzzle_jax import models, objectives, seg_inference, sharding, training
from puzzle_jax.data import datasets, input_pipeline
from puzzle_jax.evaluation import miou
from puzzle_jax.tasks import base

# What ``labels`` names for training on the split's own ground-truth masks.
GROUND_TRUTH = "ground_truth"


class SegmentationTask(base.Task):
    """DeepLabv3+ trained on label maps.

    Args:
      model_section: ``config.model`` (architecture and compute dtype; the output stride, 16, and the backbone's
        frozen BatchNorm are the model's own).
      seg_section: ``config.seg`` (``use_gn``, ``head_features``, ``low_level_features``).
      label_dir: the folder of ``<id>.png`` label maps, or ``GROUND_TRUTH`` for the split's own masks.
      produced_by: what writes ``label_dir``, for the missing-file message.
      seed: the dropout masks' seed.
    """

    def __init__(self, model_section: Any, seg_section: Any, label_dir: str, *, produced_by: str, seed: int):
        self.model_section = model_section
        self.seg_section = seg_section
        self.label_dir = label_dir
        self.produced_by = produced_by
        self.seed = int(seed)

    def load_split(self, data_config, split, field):
        if self.label_dir == GROUND_TRUTH:
            return datasets.load_split_from_config(data_config, split, field=field)
        records, info = datasets.load_split_from_config(data_config, split, decode_masks=False, field=field)
        joined = datasets.LabelFolderRecords(records, self.label_dir, info.num_classes, produced_by=self.produced_by)
        return joined, info

    def load_validation_split(self, data_config, split, field):
        # Scored against the split's own ground truth, whatever the training labels.
        return datasets.load_split_from_config(data_config, split, field=field)

    def model_config(self, split_info) -> dict[str, Any]:
        return models.segmentation_config(
            arch=self.model_section.arch,
            num_classes=split_info.num_classes + 1,
            use_gn=bool(self.seg_section.use_gn),
            head_features=int(self.seg_section.head_features),
            low_level_features=int(self.seg_section.low_level_features),
            dtype=self.model_section.dtype,
        )

    def init_parts(self, section) -> tuple[str, ...]:
        del section
        return ("model",)

    def create_objective(self, section, total_steps: int) -> training.LossFunction:
        del section, total_steps
        return objectives.create_segmentation_objective(self.seed)

    def create_transform(self, section):
        return input_pipeline.SegmentationAugmentation(
            crop_size=section.crop_size, rescale_range=tuple(section.rescale_range)
        )

    def validation_scores(self, model, validation_records):
        """The single-scale mIoU on the validation split against its ground truth (for the log only)."""
        return {"miou": float(miou.mean_iou(validation_confusion(model, validation_records)))}

    def assess(self, model, summary, train_records, validation_records):
        """Without a validation split, nothing; with one, its mIoU (one scale, no flip, no CRF; for the log, never
        for choosing a checkpoint) and a warning when the segmenter predicts a single class on every image."""
        del summary, train_records
        if validation_records is None:
            return {}
        confusion = validation_confusion(model, validation_records)
        assessment: dict[str, Any] = {
            "validation_miou": float(miou.mean_iou(confusion)),
            "validation_images": len(validation_records),
            "warnings": [],
        }
        predicted = np.flatnonzero(confusion.sum(axis=0)[:-1])
        if len(predicted) <= 1:
            assessment["warnings"].append(
                f"the segmenter predicts one class (id {predicted.tolist()}) on every validation pixel: it has not "
                "learned. Check the label maps (their share of 255), the learning rate and the number of epochs."
            )
        return assessment


def validation_confusion(model: Any, records: Any, *, pad_multiple: int = 64, images_per_call: int = 8) -> np.ndarray:
    """The ``(C, C + 1)`` confusion matrix (``miou.confusion_matrix``) of a segmenter's single-scale argmax labels on
    records with ``mask``, over this process's local devices."""
    mesh = sharding.create_local_mesh(0)
    forward = seg_inference.create_forward(model, mesh)
    masks = {}

    def images():
        for index, record in enumerate(records):
            masks[str(index)] = record["mask"]
            yield str(index), record["image"]

    probabilities = seg_inference.iterate_probabilities(
        forward,
        images(),
        scales=(1.0,),
        flip=False,
        pad_multiple=pad_multiple,
        images_per_call=images_per_call,
        batch_multiple=mesh.devices.size,
    )
    num_classes = None
    confusion = None
    for index, payload in probabilities:
        scores = payload["probabilities"]
        if confusion is None:
            num_classes = scores.shape[-1]
            confusion = np.zeros((num_classes, num_classes + 1), np.int64)
        confusion += miou.confusion_matrix(scores.argmax(axis=-1), masks.pop(index), num_classes)
    if confusion is None:
        raise ValueError("The validation split has no images.")
    return confusion
