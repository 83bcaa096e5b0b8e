"""Tests of the training tasks: what the classifier task tells the driver (model config, init parts, transform,
optimizer from the section) and the settings it rejects."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from puzzle_jax.data import input_pipeline
from puzzle_jax.tasks import classifier as classifier_task


def _cam_config(**overrides):
    cam = default.get_config().cam
    cam.update(overrides)
    return cam


def _model_section(**overrides):
    section = default.get_config().model
    section.update(dict(arch="resnet_tiny", bn_mode="global"), **overrides)
    return section


def test_bad_config_values_name_the_field():
    info = types.SimpleNamespace(num_classes=3)
    with pytest.raises(ValueError, match="model.dtype"):
        classifier_task.ClassifierTask(_model_section(dtype="float16"), objective="classification").model_config(info)
    for remat in ("sometimes", 1):
        with pytest.raises(ValueError, match="model.remat"):
            classifier_task.ClassifierTask(_model_section(remat=remat), objective="classification")
    with pytest.raises(ValueError, match="cam section"):
        classifier_task.ClassifierTask(_model_section(), objective="puzzle")
    with pytest.raises(ValueError, match="objective"):
        classifier_task.ClassifierTask(_model_section(), objective="segmentation")


def test_classifier_task_tells_the_driver_what_it_builds_and_initialises():
    info = types.SimpleNamespace(num_classes=3)
    task = classifier_task.ClassifierTask(_model_section(remat="auto"), objective="puzzle", cam_section=_cam_config())
    # "auto" builds the model without remat; the driver decides.
    assert task.remat_auto
    assert task.model_config(info) == {
        "family": "classifier",
        "arch": "resnet_tiny",
        "num_classes": 3,
        "output_stride": 16,
        "bn_mode": "global",
        "bn_group_size": None,
        "dtype": "float32",
        "remat": False,
        "bn_statistics": "two_pass",
        "grouped_conv": "grouped",
    }
    # The program choices travel from the config to the model config.
    faster = classifier_task.ClassifierTask(_model_section(bn_statistics="one_pass"), objective="classification")
    assert faster.model_config(info)["bn_statistics"] == "one_pass"
    per_replica = classifier_task.ClassifierTask(
        _model_section(bn_mode="per_replica", bn_group_size=4, remat=True), objective="classification"
    )
    assert per_replica.model_config(info)["bn_group_size"] == 4 and per_replica.model_config(info)["remat"] is True
    assert not per_replica.remat_auto
    section = default.get_config().train_cam
    assert task.init_parts(section) == ("model",)
    section.init_head = True
    assert task.init_parts(section) == ("model", "classifier")
    transform = task.create_transform(section)
    assert isinstance(transform, input_pipeline.ClassifierAugmentation)
    assert (transform.crop_size, transform.rescale_range) == (512, (320, 640))


def test_the_default_optimizer_follows_the_section():
    """Task.create_optimizer: the section's learning rate, weight decay, poly power and momentum mode."""
    from puzzle_jax import optim

    params = {"model": {"conv": {"kernel": jnp.ones((2,))}}, "classifier": {"kernel": jnp.ones((2,))}}
    grads = {"model": {"conv": {"kernel": jnp.ones((2,))}}, "classifier": {"kernel": jnp.ones((2,))}}
    section = default.get_config().train_cam
    section.update(learning_rate=0.5, weight_decay=0.0, momentum_mode="standard", momentum=0.9, nesterov=False)
    task = classifier_task.ClassifierTask(_model_section(), objective="classification")
    optimizer = task.create_optimizer(params, section, total_steps=10)
    expected = optim.create_optimizer(
        params, learning_rate=0.5, weight_decay=0.0, total_steps=10, momentum_mode="standard", nesterov=False
    )
    state, expected_state = optimizer.init(params), expected.init(params)
    for _ in range(2):
        updates, state = optimizer.update(grads, state, params)
        expected_updates, expected_state = expected.update(grads, expected_state, params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected_updates)):
        np.testing.assert_array_equal(a, b)
    # Standard momentum 0.9 makes the second update 1.9x the first (lr 0.5 x poly); the authors' mode would not.
    np.testing.assert_allclose(float(updates["model"]["conv"]["kernel"][0]), -0.5 * 0.9**0.9 * 1.9, rtol=1e-5)
