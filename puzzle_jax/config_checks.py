"""Start-up validation of a run's config: the one place that says which values each field allows.

``pipeline.run_stages`` calls ``check_config`` before any stage runs, so a bad value (a negative learning rate, zero
epochs, a log interval of 0, a threshold outside [0, 1], a range of the wrong length) fails at once with one error
that lists every problem, each naming the field, its value and what is allowed, instead of surfacing minutes later
as a wrong diagnosis, a ``ZeroDivisionError`` or a model trained with exit status 0.

The checks are driven by the config's shape: a section holding ``batch_size``, ``epochs`` and ``learning_rate`` is a
training section (``pretrain``, ``train_cam``, ``train_aff``, and any later one) and gets ``TRAINING_RULES``; the other
sections get the rules of their name in ``SECTION_RULES``. A rule whose field a config lacks is skipped. What
depends on the data or the devices (a batch divisible by the devices, a split that exists) is checked where those are
known, by the stage.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from puzzle_jax import losses, models, objectives, optim, per_image, ray_backend

# A predicate on a value and the words that say what it allows ("must be <allowed>").
Rule = tuple[Callable[[Any], bool], str]

# The fields that make a section a training section (``driver.train_and_export`` reads them all).
TRAINING_SECTION_FIELDS = ("batch_size", "epochs", "learning_rate")


class ConfigError(ValueError):
    """A config value that no stage can run with; the message names every offending field."""


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(minimum: int) -> Rule:
    return (lambda value: _integer(value) and value >= minimum), (
        "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    )


def _positive_number() -> Rule:
    return (lambda value: _number(value) and value > 0), "a finite number > 0"


def _non_negative_number() -> Rule:
    return (lambda value: _number(value) and value >= 0), "a finite number >= 0"


def _fraction() -> Rule:
    return (lambda value: _number(value) and 0 <= value <= 1), "a number in [0, 1]"


def _one_of(allowed: Sequence[Any]) -> Rule:
    return (lambda value: value in tuple(allowed)), f"one of {list(allowed)}"


def _non_empty_text() -> Rule:
    return (lambda value: isinstance(value, str) and bool(value.strip())), "a non-empty string"


def _text() -> Rule:
    return (lambda value: isinstance(value, str)), "a string"


def _boolean() -> Rule:
    return (lambda value: isinstance(value, bool)), "True or False"


def _size_range() -> Rule:
    def valid(value):
        return _sequence(value, 2) and all(_integer(side) and side > 0 for side in value) and value[0] <= value[1]

    return valid, "two positive integers (smallest, largest) with smallest <= largest"


def _threshold_range() -> Rule:
    def valid(value):
        if not (_sequence(value, 3) and all(_number(part) for part in value)):
            return False
        start, stop, step = value
        return 0 <= start <= stop <= 1 and step > 0

    return valid, "three numbers (start, stop, step) with 0 <= start <= stop <= 1 and step > 0"


def _scales() -> Rule:
    def valid(value):
        return _sequence(value) and len(value) > 0 and all(_number(scale) and scale > 0 for scale in value)

    return valid, "a non-empty list of numbers > 0"


def _sequence(value: Any, length: int | None = None) -> bool:
    return isinstance(value, (tuple, list)) and (length is None or len(value) == length)


TRAINING_RULES: dict[str, Rule] = {
    "batch_size": _at_least(1),
    "validate_every_epochs": _at_least(0),
    "epochs": _at_least(1),
    "learning_rate": _positive_number(),
    "weight_decay": _non_negative_number(),
    "poly_power": _non_negative_number(),
    "nesterov": _boolean(),
    "momentum_mode": _one_of(optim.MOMENTUM_MODES),
    "momentum": ((lambda value: _number(value) and 0 <= value < 1), "a number in [0, 1)"),
    "crop_size": _at_least(1),
    "rescale_range": _size_range(),
    "init_head": _boolean(),
    "log_every_steps": _at_least(1),
    "checkpoint_every_steps": _at_least(1),
    "max_to_keep": _at_least(1),
    # train_aff: the pair radius on the label grid.
    "radius": _at_least(1),
}

SECTION_RULES: dict[str, dict[str, Rule]] = {
    "mesh": {"num_devices": _at_least(0), "barrier_timeout_minutes": _positive_number()},
    "data": {"worker_count": _at_least(0), "reshuffle_on_process_change": _boolean()},
    "model": {
        "arch": _one_of(models.ARCHITECTURES),
        "output_stride": _one_of(models.OUTPUT_STRIDES),
        "bn_mode": _one_of(models.BN_MODES),
        "bn_group_size": _at_least(1),
        "dtype": _one_of(tuple(models.DTYPES)),
        "remat": _one_of((True, False, "auto")),
    },
    "cam": {
        "loss_option": _one_of(losses.LOSS_OPTIONS),
        "grid": _at_least(1),
        "level": _one_of(objectives.CAM_LEVELS),
        "re_loss": _one_of(losses.RECONSTRUCTION_NORMS),
        "re_loss_option": _one_of(losses.RECONSTRUCTION_OPTIONS),
        "alpha": _non_negative_number(),
        "alpha_schedule": _fraction(),
    },
    "infer": {
        "scales": _scales(),
        "flip": _boolean(),
        "pad_multiple": _at_least(1),
        "images_per_call": _at_least(1),
        "host_threads": _at_least(0),
        "max_pixels_per_call": _at_least(0),
    },
    "eval": {"threshold_range": _threshold_range(), "gallery_images": _at_least(0)},
    "refine": {
        "aff_fg_threshold": _fraction(),
        "aff_bg_threshold": _fraction(),
        "aff_crf_iterations": _at_least(0),
        "rw_threshold": _fraction(),
        "pseudo_crf_iterations": _at_least(0),
        "workers": _at_least(0),
        "backend": _one_of(per_image.HOST_BACKENDS),
        "ray_address": _text(),
        "max_retries": _at_least(0),
        "edge_canvas": _at_least(1),
        "rw_radius": _at_least(1),
        "rw_beta": _positive_number(),
        "rw_exp_times": _at_least(0),
    },
    "seg": {
        "labels": _non_empty_text(),
        "use_gn": _boolean(),
        "head_features": _at_least(1),
        "low_level_features": _at_least(1),
        "split": _non_empty_text(),
        "scales": _scales(),
        "flip": _boolean(),
        "crf_iterations": _at_least(0),
        "workers": _at_least(0),
    },
}


def is_training_section(section: Any) -> bool:
    """Whether a config section has the shape of a training stage's settings (``configs.default.training_section``)."""
    return isinstance(section, ml_collections.ConfigDict) and all(field in section for field in TRAINING_SECTION_FIELDS)


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Every problem of ``config``, one sentence each (``"<section>.<field>=<value>: must be <allowed>."``)."""
    problems = []
    for name, section in config.items():
        if not isinstance(section, ml_collections.ConfigDict):
            continue
        rules = dict(SECTION_RULES.get(name, {}))
        if is_training_section(section):
            rules.update(TRAINING_RULES)
        for field, (valid, allowed) in rules.items():
            if field in section and not valid(section[field]):
                problems.append(f"{name}.{field}={_shown(section[field])}: must be {allowed}.")
    refine = config.get("refine")
    if refine is not None and not any(problem.startswith("refine.aff_") for problem in problems):
        if "aff_bg_threshold" in refine and refine.aff_bg_threshold > refine.aff_fg_threshold:
            problems.append(
                f"refine.aff_bg_threshold={refine.aff_bg_threshold} is above refine.aff_fg_threshold="
                f"{refine.aff_fg_threshold}: the confident-background score must not exceed the foreground one."
            )
    # Checked here, before hours of training, not when the first label stage starts; Ray is not imported.
    if refine is not None and refine.get("backend") == "ray" and importlib.util.find_spec("ray") is None:
        problems.append(f"refine.backend='ray': Ray is not installed; {ray_backend.INSTALL_HINT}.")
    return problems


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` listing every problem of ``config`` (``config_problems``); returns when there is none."""
    problems = config_problems(config)
    if problems:
        raise ConfigError(
            "The config has invalid values (fix them on the command line, e.g. --config.train_cam.epochs=2, or in "
            "the config file):\n  " + "\n  ".join(problems)
        )


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return repr(value)
