"""Tests of the start-up config validation: every shipped config passes; each bad value is named with what is allowed,
all at once, before any stage runs."""

import importlib
import os
import sys
import types

import pytest

from configs import default
from puzzle_jax import config_checks, pipeline

CONFIG_FILES = ("default", "demo", "resnet50", "resnest50", "resnest101", "resnest269", "coco_resnest101")


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_shipped_config_is_valid(name):
    assert config_checks.config_problems(importlib.import_module(f"configs.{name}").get_config()) == []


def _problems(**overrides):
    """The problems of the default config with ``overrides`` ({"section.field": value}) applied."""
    config = default.get_config()
    for path, value in overrides.items():
        section, field = path.rsplit(".", 1)
        config[section][field] = value
    return config_checks.config_problems(config)


@pytest.mark.parametrize(
    "field,value,allowed",
    [
        ("train_cam.learning_rate", -0.1, "a finite number > 0"),
        ("train_cam.learning_rate", float("nan"), "a finite number > 0"),
        ("train_cam.epochs", 0, "a positive integer"),
        ("train_cam.log_every_steps", 0, "a positive integer"),
        ("pretrain.checkpoint_every_steps", -5, "a positive integer"),
        ("train_aff.max_to_keep", 0, "a positive integer"),
        ("train_aff.batch_size", 0, "a positive integer"),
        ("train_aff.radius", 0, "a positive integer"),
        ("train_cam.weight_decay", -1e-4, "a finite number >= 0"),
        ("train_cam.momentum", 1.0, "a number in [0, 1)"),
        ("train_cam.momentum_mode", "nesterov", "one of ['authors', 'standard']"),
        ("refine.rw_threshold", 1.5, "a number in [0, 1]"),
        ("refine.aff_fg_threshold", -0.1, "a number in [0, 1]"),
        ("refine.aff_crf_iterations", -1, "an integer >= 0"),
        ("cam.alpha_schedule", 2.0, "a number in [0, 1]"),
        ("cam.grid", 0, "a positive integer"),
        ("cam.loss_option", "cl_pcl_rr", "one of ['cl', 'cl_pcl', 'cl_re', 'cl_pcl_re']"),
        ("model.output_stride", 12, "one of [8, 16, 32]"),
        ("infer.images_per_call", 0, "a positive integer"),
        ("mesh.num_devices", -1, "an integer >= 0"),
    ],
)
def test_a_bad_value_is_named_with_what_is_allowed(field, value, allowed):
    assert _problems(**{field: value}) == [f"{field}={value!r}: must be {allowed}."]


@pytest.mark.parametrize(
    "field,value,allowed",
    [
        ("train_cam.rescale_range", (320,), "two positive integers (smallest, largest) with smallest <= largest"),
        ("train_cam.rescale_range", (640, 320), "two positive integers (smallest, largest) with smallest <= largest"),
        ("eval.threshold_range", (0.05, 0.75), "three numbers (start, stop, step) with 0 <= start <= stop <= 1"),
        ("eval.threshold_range", (0.05, 1.5, 0.05), "three numbers (start, stop, step) with 0 <= start <= stop <= 1"),
        ("eval.threshold_range", (0.05, 0.75, 0.0), "and step > 0"),
        ("infer.scales", (), "a non-empty list of numbers > 0"),
        ("infer.scales", (1.0, -0.5), "a non-empty list of numbers > 0"),
    ],
)
def test_tuple_fields_of_the_wrong_length_or_order_are_named(field, value, allowed):
    (problem,) = _problems(**{field: value})
    assert problem.startswith(f"{field}={list(value)!r}: must be ") and allowed in problem


def test_the_confident_background_threshold_may_not_exceed_the_foreground_one():
    assert _problems(**{"refine.aff_bg_threshold": 0.5}) == [
        "refine.aff_bg_threshold=0.5 is above refine.aff_fg_threshold=0.4: the confident-background score must not "
        "exceed the foreground one."
    ]


def test_any_section_of_the_training_shape_is_checked_as_one():
    """A training section added later (e.g. the segmenter's train_seg) is recognised by its fields, not its name."""
    config = default.get_config()
    config.train_seg = default.training_section(
        split="train_aug", batch_size=0, epochs=3, learning_rate=0.007, crop_size=512, rescale_range=(320, 640)
    )
    assert config_checks.config_problems(config) == ["train_seg.batch_size=0: must be a positive integer."]
    assert config_checks.is_training_section(config.train_seg) and not config_checks.is_training_section(config.infer)


def test_one_error_lists_every_problem():
    config = default.get_config()
    config.train_cam.learning_rate = -0.1
    config.pretrain.epochs = 0
    with pytest.raises(config_checks.ConfigError) as raised:
        config_checks.check_config(config)
    message = str(raised.value)
    assert "pretrain.epochs=0: must be a positive integer." in message
    assert "train_cam.learning_rate=-0.1: must be a finite number > 0." in message
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    "field,value", [("train_cam.learning_rate", -0.1), ("train_cam.epochs", 0), ("train_cam.log_every_steps", 0)]
)
def test_the_pipeline_refuses_a_bad_config_before_any_stage_runs(tmp_path, monkeypatch, field, value):
    """The issue's rows: a negative learning rate trained and exported a model; zero epochs got a wrong diagnosis and
    a log interval of 0 a ZeroDivisionError, both after data loading. Now nothing runs and nothing is written."""
    ran = []
    module = types.ModuleType("fake_train_cam")
    module.run = lambda config, workdir: ran.append(config) or {}
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(pipeline, "STAGES", {"train_cam": module.__name__})
    config = default.get_config()
    config.stages = ("train_cam",)
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(config_checks.ConfigError, match=rf"{field}={value!r}: must be"):
        pipeline.run_stages(config, str(tmp_path / "run"))
    assert ran == [] and not os.path.exists(tmp_path / "run")
