"""The ``Task`` interface of the training driver.

A task is a small object per model family. The driver (``driver.train_and_export``) asks it, in this order, for the
records of the training and validation splits (``load_split``, ``load_validation_split``), the model config to build
and export (``model_config``), the parts of an exported model that ``init_from`` copies (``init_parts``), the optimizer
(``create_optimizer``; the default is the authors' poly SGD with the stage section's settings), the objective
(``create_objective``), the per-example input transform of the train loader (``create_transform``) and, after
training, whether it learned (``assess``). A new model family needs a task and a model builder
(``models.create_model``), and no change to the driver.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import optax

from puzzle_jax import optim, training


class Task(abc.ABC):
    """What the driver needs from a model family; the stage section (``config.<stage>``) is passed where it matters.

    Attributes:
      remat_auto: the family's config asks the driver to decide activation recomputation (``"auto"``): the driver
        compiles the step without it and turns it on when XLA's memory estimate does not fit a device.
    """

    remat_auto: bool = False

    @abc.abstractmethod
    def load_split(self, data_config: Any, split: str, field: str) -> tuple[Sequence[dict], Any]:
        """The training records (random access, picklable for grain workers) and the split's ``SplitInfo``;
        ``field`` names the config field of the split in errors."""

    def load_validation_split(self, data_config: Any, split: str, field: str) -> tuple[Sequence[dict], Any]:
        """The records ``assess`` scores (the default: as ``load_split``; a task whose training labels come from an
        earlier stage scores the split's own ground truth instead)."""
        return self.load_split(data_config, split, field)

    @abc.abstractmethod
    def model_config(self, split_info: Any) -> dict[str, Any]:
        """The model config (``models``' schema) to build, train and export; with ``remat_auto``, remat off."""

    @abc.abstractmethod
    def init_parts(self, section: Any) -> tuple[str, ...]:
        """Top-level model attributes that ``init_from`` initialises (e.g. ``("model",)``, the backbone)."""

    @abc.abstractmethod
    def create_objective(self, section: Any, total_steps: int) -> training.LossFunction:
        """``compute_loss(model, batch, step) -> (loss, metrics)`` for batches of ``create_transform``'s examples."""

    @abc.abstractmethod
    def create_transform(self, section: Any) -> Any:
        """The train loader's per-example random transform (a ``grain.RandomMapTransform``)."""

    def assess(
        self, model: Any, summary: dict[str, Any], train_records: Any, validation_records: Any | None
    ) -> dict[str, Any]:
        """What the stage's summary says about whether training learned, computed after training with the trained
        model in evaluation mode: metrics on ``validation_records`` (None when the section names no validation
        split) and ``"warnings"``, sentences the driver prints. The default says nothing."""
        return {}

    def validation_scores(self, model: Any, validation_records: Any) -> dict[str, float]:
        """The scores of the model (in evaluation mode) on the validation records that the driver logs every
        ``<stage>.validate_every_epochs`` epochs, for the log only (the default: none)."""
        return {}

    def create_optimizer(self, params: Any, section: Any, total_steps: int) -> optax.GradientTransformation:
        """The authors' four-group poly SGD (``optim``) with the section's settings."""
        return optim.create_optimizer(params, total_steps=total_steps, **optimizer_settings(section))


def optimizer_settings(section: Any) -> dict[str, Any]:
    """The optimizer keywords of ``optim``'s builders that a training section (``config.<stage>``) sets."""
    return dict(
        learning_rate=section.learning_rate,
        weight_decay=section.weight_decay,
        poly_power=section.poly_power,
        nesterov=section.nesterov,
        momentum_mode=section.momentum_mode,
        momentum=section.momentum,
    )
