"""Tests of the config files: they load, every field is documented, and the paper settings are the spec's."""

import glob
import importlib
import os
import re

import pytest
from flax import nnx

from puzzle_jax import classifier_training

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
    model_config = classifier_training.model_config_from(config, num_classes=20)
    # eval_shape: builds the module structure without allocating ResNeSt-269's weights.
    model = nnx.eval_shape(lambda: classifier_training.build_classifier(model_config, seed=0))
    assert model.classifier.kernel.shape[-1] == 20


def test_paper_settings_follow_the_spec():
    for name in ("resnet50", "resnest50", "resnest101", "resnest269"):
        config = _load(name)
        assert config.model.arch == name
        assert (config.train.batch_size, config.train.epochs, config.train.learning_rate) == (
            32,
            15,
            0.1,
        )
        assert (config.train.weight_decay, config.train.poly_power, config.train.momentum_mode) == (
            1e-4,
            0.9,
            "authors",
        )
        assert (config.data.crop_size, tuple(config.data.rescale_range)) == (512, (320, 640))
        assert (config.cam.alpha, config.cam.alpha_schedule, config.cam.grid) == (4.0, 0.5, 2)
        assert (config.cam.loss_option, config.cam.re_loss, config.cam.re_loss_option) == (
            "cl_pcl_re",
            "l1",
            "masking",
        )
        assert tuple(config.infer.scales) == (0.5, 1.0, 1.5, 2.0)
        assert config.data.train_split == "train_aug" and config.infer.split == "train"
