"""Tests of the config files: they load, every field is documented, and the paper settings are the spec's."""

import glob
import importlib
import os
import re
import types

import pytest
from flax import nnx

from configs import default
from puzzle_jax import models
from puzzle_jax.tasks import classifier as classifier_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_NAMES = sorted(
    os.path.splitext(os.path.basename(path))[0]
    for path in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if not path.endswith("__init__.py")
)


def _load(name):
    return importlib.import_module(f"configs.{name}").get_config()


def test_every_field_assignment_has_a_comment():
    for name in CONFIG_NAMES:
        lines = open(os.path.join(REPO, "configs", f"{name}.py")).read().splitlines()
        for number, line in enumerate(lines):
            if re.match(r"\s*config(\.\w+)+ = ", line) and "ConfigDict()" not in line:
                previous = lines[number - 1].strip()
                assert previous.startswith("#") or "#" in line, f"configs/{name}.py:{number + 1} lacks a comment"


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_loads_and_builds_its_model(name):
    config = _load(name)
    task = classifier_task.ClassifierTask(config.model, objective="puzzle", cam_section=config.cam)
    model_config = task.model_config(types.SimpleNamespace(num_classes=20))
    # eval_shape: builds the module structure without allocating ResNeSt-269's weights.
    model = nnx.eval_shape(lambda: models.create_model(model_config, rngs=nnx.Rngs(0)))
    assert model.classifier.kernel.shape[-1] == 20


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_training_sections_have_one_shape(name):
    """pretrain and train_cam carry the same fields (the driver reads them all), each its own values."""
    config = _load(name)
    reference = set(default.training_section(
        split="s", batch_size=1, epochs=1, learning_rate=0.1, crop_size=8, rescale_range=(8, 8)
    ))
    for stage in ("pretrain", "train_cam"):
        assert set(config[stage]) == reference, stage
    assert "train" not in config and "train_split" not in config.data and "init_from" not in config.model


def test_paper_settings_follow_the_spec():
    for name in ("resnet50", "resnest50", "resnest101", "resnest269"):
        config = _load(name)
        assert config.model.arch == name
        section = config.train_cam
        assert (section.batch_size, section.epochs, section.learning_rate) == (32, 15, 0.1)
        assert (section.weight_decay, section.poly_power, section.momentum_mode, section.nesterov) == (
            1e-4,
            0.9,
            "authors",
            True,
        )
        assert (section.crop_size, tuple(section.rescale_range)) == (512, (320, 640))
        assert (config.cam.alpha, config.cam.alpha_schedule, config.cam.grid) == (4.0, 0.5, 2)
        assert (config.cam.loss_option, config.cam.re_loss, config.cam.re_loss_option) == (
            "cl_pcl_re",
            "l1",
            "masking",
        )
        assert tuple(config.infer.scales) == (0.5, 1.0, 1.5, 2.0)
        assert section.split == "train_aug" and config.infer.split == "train_aug" and config.eval.split == "train"
        assert config.train_aff.split == config.infer.split
