"""The CAM classifier's training task: classification alone (``pretrain``) or the Puzzle-CAM objective
(``train_cam``, spec §3), both from ``objectives``.

Both build a classifier (``models.classifier_config``) from ``config.model``, read images and image-level labels
only (the masks are not decoded), and train on the loader's uint8 crops (``input_pipeline.ClassifierAugmentation``).
``init_from`` copies the backbone, and the 1x1 head too when the section's ``init_head`` is set (an exported model
with the same classes).
"""

from __future__ import annotations

from typing import Any

from puzzle_jax import cam_inference, models, objectives, training
from puzzle_jax.data import datasets, input_pipeline
from puzzle_jax.evaluation import classification
from puzzle_jax.tasks import base

OBJECTIVES = ("classification", "puzzle")
# A class loss above this share of the label prior's (predicting each class's frequency, images unseen) means the
# classifier has learned next to nothing from the images.
NOT_LEARNED_LOSS_FRACTION = 0.8


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
            bn_statistics=section.bn_statistics,
            grouped_conv=section.grouped_conv,
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

    def validation_scores(self, model, validation_records):
        """The validation split's mAP (%) from its image-level labels (for the log only)."""
        logits, labels = cam_inference.classify(
            model, validation_records, output_stride=int(self.model_section.output_stride)
        )
        mean_ap, _ = classification.mean_average_precision(logits, labels)
        return {"map": float(mean_ap)}

    def assess(self, model, summary, train_records, validation_records):
        """The label prior of the training split against the class loss of the last tenth of training and, on the
        validation split, mAP, class loss and label prior; a warning where a loss stays near its prior."""
        assessment: dict[str, Any] = {"warnings": []}
        prior = classification.label_prior_loss(train_records.labels())
        final = summary.get("last_tenth_metrics", {}).get("class_loss")
        assessment["train_label_prior_loss"] = prior
        if final is not None and final > NOT_LEARNED_LOSS_FRACTION * prior:
            assessment["warnings"].append(
                f"the training class loss ended at {final:.3f}, near the {prior:.3f} of predicting each class's "
                "frequency without looking at the images: the classifier has not learned. Check the learning rate, "
                "the momentum (momentum_mode), the number of epochs and the data."
            )
        if validation_records is not None:
            logits, labels = cam_inference.classify(
                model, validation_records, output_stride=int(self.model_section.output_stride)
            )
            mean_ap, _ = classification.mean_average_precision(logits, labels)
            loss = classification.multilabel_soft_margin_loss(logits, labels)
            validation_prior = classification.label_prior_loss(labels)
            assessment.update(
                validation_map=mean_ap,
                validation_class_loss=loss,
                validation_label_prior_loss=validation_prior,
                validation_images=len(labels),
            )
            if loss > NOT_LEARNED_LOSS_FRACTION * validation_prior:
                assessment["warnings"].append(
                    f"the validation class loss is {loss:.3f} (mAP {mean_ap:.1f}%), near the {validation_prior:.3f} "
                    "of the label prior: the classifier does not recognise the classes in unseen images."
                )
        return assessment

    def create_transform(self, section):
        return input_pipeline.ClassifierAugmentation(
            crop_size=section.crop_size, rescale_range=tuple(section.rescale_range)
        )
