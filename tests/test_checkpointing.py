"""Tests of training checkpoints and exported models (the Orbax boundary)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from puzzle_jax import checkpointing, models, sharding


def _state(value):
    return {
        "params": {"layer1": {0: {"kernel": jnp.full((2, 3), value)}}},
        "step": jnp.asarray(value, jnp.int32),
    }


def test_training_checkpoint_round_trip_keeps_placement_and_data_state(tmp_path):
    mesh = sharding.create_mesh(8)
    checkpointer = checkpointing.TrainingCheckpointer(str(tmp_path), save_every_steps=1, max_to_keep=2)
    assert checkpointer.restore_or_none(_state(0)) is None
    for step in (1, 2, 3):
        checkpointer.save(step, sharding.replicate(_state(step), mesh), {"iterator": f"position {step}"})
    checkpointer.wait_until_finished()
    assert checkpointer.latest_step() == 3
    target = sharding.replicate(_state(0), mesh)
    state, data_state, step = checkpointer.restore_or_none(target)
    checkpointer.close()
    assert step == 3 and data_state == {"iterator": "position 3"}
    np.testing.assert_array_equal(state["params"]["layer1"][0]["kernel"], np.full((2, 3), 3.0))
    assert state["params"]["layer1"][0]["kernel"].sharding == sharding.replicated(mesh)
    # Retention: only the two newest steps stay on disk.
    assert sorted(int(name) for name in os.listdir(tmp_path) if name.isdigit()) == [2, 3]


def test_export_round_trip_and_errors(tmp_path):
    export = str(tmp_path / "model")
    params = {"model": {"conv1": {"kernel": jnp.arange(6.0).reshape(2, 3)}}}
    stats = {"model": {"bn1": {"mean": jnp.ones(3)}}}
    checkpointing.export_model(export, params, stats, {"arch": "x", "num_classes": 2})
    assert checkpointing.is_exported_model(export)
    assert checkpointing.load_model_config(export) == {"arch": "x", "num_classes": 2}
    target = {
        "params": jax.tree.map(jnp.zeros_like, params),
        "batch_stats": jax.tree.map(jnp.zeros_like, stats),
    }
    loaded_params, loaded_stats, config = checkpointing.load_exported_model(export, target)
    np.testing.assert_array_equal(loaded_params["model"]["conv1"]["kernel"], params["model"]["conv1"]["kernel"])
    np.testing.assert_array_equal(loaded_stats["model"]["bn1"]["mean"], np.ones(3))
    assert config["arch"] == "x"
    wrong = {
        "params": {"model": {"conv1": {"kernel": jnp.zeros((5, 5))}}},
        "batch_stats": target["batch_stats"],
    }
    with pytest.raises(ValueError, match="does not match"):
        checkpointing.load_exported_model(export, wrong)
    with pytest.raises(FileNotFoundError, match="not an exported puzzle_jax model"):
        checkpointing.load_model_config(str(tmp_path / "missing"))


def _classifier_config(num_classes=4):
    return models.classifier_config(arch="resnet_tiny", num_classes=num_classes, bn_mode="global")


def _export_classifier(directory, seed, num_classes=4, *, legacy=False):
    model_config = _classifier_config(num_classes)
    model = models.create_model(model_config, rngs=nnx.Rngs(seed))
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    # Non-trivial batch statistics, so that copying them is observable.
    stats = jax.tree.map(lambda x: x + 0.5, nnx.as_pure(stats))
    if legacy:  # as exported before model families were recorded
        model_config = {key: value for key, value in model_config.items() if key != "family"}
    checkpointing.export_model(directory, nnx.as_pure(params), stats, model_config)
    return nnx.as_pure(params), stats


@pytest.mark.parametrize("legacy", [False, True], ids=["family-recorded", "no-family"])
def test_load_exported_rebuilds_the_model_in_eval_mode(tmp_path, legacy):
    export = str(tmp_path / "export")
    params, stats = _export_classifier(export, seed=4, legacy=legacy)
    model, model_config = checkpointing.load_exported(export, family="classifier")
    assert models.model_family(model_config) == "classifier"
    assert isinstance(model, models.Classifier)
    reference = models.create_model(_classifier_config(), rngs=nnx.Rngs(0))
    nnx.update(reference, params, stats)
    reference.eval()
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 48, 48, 3)), jnp.float32)
    # Evaluation mode: the (shifted) running statistics are used, so the outputs equal the reference's exactly.
    np.testing.assert_array_equal(np.asarray(model(images)[1]), np.asarray(reference(images)[1]))
    with pytest.raises(ValueError, match="holds a classifier model; a segmentation model is needed"):
        checkpointing.load_exported(export, family="segmentation")


def test_initialise_from_export_copies_the_named_parts_only(tmp_path):
    export = str(tmp_path / "export")
    params, stats = _export_classifier(export, seed=1)

    def state(model):
        _, own_params, own_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        return nnx.as_pure(own_params), nnx.as_pure(own_stats)

    target = models.create_model(_classifier_config(), rngs=nnx.Rngs(2))
    head_before = np.asarray(state(target)[0]["classifier"]["kernel"])
    checkpointing.initialise_from_export(target, export, ("model",), field="train_cam.init_from")
    new_params, new_stats = state(target)
    for loaded, source in ((new_params, params), (new_stats, stats)):
        for a, b in zip(jax.tree.leaves(source["model"]), jax.tree.leaves(loaded["model"]), strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(new_params["classifier"]["kernel"], head_before)

    checkpointing.initialise_from_export(target, export, ("model", "classifier"), field="train_cam.init_from")
    np.testing.assert_array_equal(state(target)[0]["classifier"]["kernel"], params["classifier"]["kernel"])

    other_classes = models.create_model(_classifier_config(6), rngs=nnx.Rngs(2))
    field = "train_cam.init_from"
    with pytest.raises(ValueError, match="train_cam.init_from=.*under 'classifier' do not match.*4 classes"):
        checkpointing.initialise_from_export(other_classes, export, ("model", "classifier"), field=field)
    # The backbone alone still fits a model with another number of classes (ImageNet -> VOC).
    checkpointing.initialise_from_export(other_classes, export, ("model",), field=field)
    with pytest.raises(FileNotFoundError, match="pretrain.init_from=.*not an exported puzzle_jax model.*config.stages"):
        checkpointing.initialise_from_export(other_classes, str(tmp_path / "nowhere"), ("model",),
                                             field="pretrain.init_from")
