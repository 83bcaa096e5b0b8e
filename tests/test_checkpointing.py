"""Tests of training checkpoints and exported models (the Orbax boundary)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puzzle_jax import checkpointing, sharding


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
