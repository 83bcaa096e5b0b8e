"""Tests of the generic training driver: train-and-export of a task, skipping, errors, the remat decision."""

import importlib

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import default
from puzzle_jax import checkpointing, driver, models, objectives, optim, pipeline, sharding, training
from puzzle_jax.tasks import classifier as classifier_task

NUM_CLASSES = 4


def _tiny_demo_config(tmp_path, **train_cam):
    """The demo config on a tiny demo dataset, train_cam at 64 px for one epoch of 8 images."""
    config = importlib.import_module("configs.demo").get_config()
    config.data.data_dir = str(tmp_path / "data")
    config.data.builder_kwargs = ml_collections.ConfigDict(dict(num_pretrain=2, num_train=8, num_val=2))
    config.train_cam.update(
        dict(init_from="", crop_size=64, rescale_range=(48, 80), batch_size=8, epochs=1, learning_rate=0.01),
        **train_cam,
    )
    return config


def _puzzle_task(config):
    return classifier_task.ClassifierTask(config.model, objective="puzzle", cam_section=config.cam)


def test_train_and_export_writes_a_loadable_model_and_skips_when_it_exists(tmp_path):
    config = _tiny_demo_config(tmp_path, epochs=2)
    paths = pipeline.Workdir(str(tmp_path / "run")).training("train_cam")
    summary = driver.train_and_export(_puzzle_task(config), config, "train_cam", paths, init_from="", seed=0)
    assert (summary["final_step"], summary["total_steps"], summary["images"], summary["batch_size"]) == (2, 2, 8, 8)
    assert summary["exported_model"] == paths.export and summary["remat"] is False
    assert {"loss", "class_loss", "puzzle_class_loss", "reconstruction_loss"} <= set(summary["last_metrics"])
    # Two steps teach a random classifier nothing: the class loss is still above the label prior, and the stage says
    # so; the validation split is scored all the same.
    assert summary["last_tenth_metrics"]["class_loss"] > summary["train_label_prior_loss"] > 0.3
    assert summary["validation_images"] == 2 and 0.0 <= summary["validation_map"] <= 100.0
    assert summary["validation_class_loss"] > summary["validation_label_prior_loss"]
    assert len(summary["warnings"]) == 2 and "has not learned" in summary["warnings"][0]
    model, model_config = checkpointing.load_exported(paths.export, family="classifier")
    assert model_config["family"] == "classifier" and model_config["num_classes"] == 5
    assert isinstance(model, models.Classifier)
    # A second run finds the export and trains nothing (not even the data is opened).
    config.data.dataset = "no_such_dataset"
    assert driver.train_and_export(_puzzle_task(config), config, "train_cam", paths, init_from="", seed=0) == {
        "exported_model": paths.export,
        "skipped": True,
    }


def test_bad_sizes_name_the_sections_field(tmp_path):
    config = _tiny_demo_config(tmp_path, batch_size=12)
    paths = pipeline.Workdir(str(tmp_path / "run")).training("train_cam")
    config.mesh.num_devices = 8
    with pytest.raises(ValueError, match=r"train_cam\.batch_size=12 must be divisible"):
        driver.train_and_export(_puzzle_task(config), config, "train_cam", paths, init_from="", seed=0)
    config = _tiny_demo_config(tmp_path, batch_size=16)
    with pytest.raises(ValueError, match=r"8 images: fewer than one batch of 16; lower train_cam\.batch_size"):
        driver.train_and_export(_puzzle_task(config), config, "train_cam", paths, init_from="", seed=0)
    config = _tiny_demo_config(tmp_path, split="pretrian")
    with pytest.raises(ValueError, match=r"'pretrian' \(train_cam\.split\) of dataset 'puzzle_demo'; its splits are "
                       r"\['pretrain', 'train', 'val'\]\. Set train_cam\.split to one of them"):
        driver.train_and_export(_puzzle_task(config), config, "train_cam", paths, init_from="", seed=0)
    config = _tiny_demo_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train_cam\.init_from=.*not an exported puzzle_jax model"):
        driver.train_and_export(
            _puzzle_task(config), config, "train_cam", paths, init_from=str(tmp_path / "missing"), seed=0
        )


@pytest.mark.parametrize(
    "limit,expected",
    [(None, False), (1, True), (1 << 50, False)],
    ids=["no-limit-reported", "tiny-device", "huge-device"],
)
def test_auto_remat_compares_the_steps_memory_estimate_with_the_device(monkeypatch, limit, expected):
    monkeypatch.setattr(sharding, "device_memory_limit", lambda: limit)
    model_config = models.classifier_config(arch="resnet_tiny", num_classes=NUM_CLASSES, bn_mode="global")
    model = models.create_model(model_config, rngs=nnx.Rngs(0))
    model.train()
    _, params, _ = training.split_model(model)
    optimizer = optim.create_optimizer(params, learning_rate=0.1, weight_decay=1e-4, total_steps=10)
    objective = objectives.create_puzzle_objective(default.get_config().cam, 10, output_stride=16)
    batch = {
        "image": ((8, 64, 64, 3), np.uint8),
        "image_box": ((8, 4), np.int32),
        "labels": ((8, NUM_CLASSES), np.float32),
    }
    remat, facts = driver.choose_remat(model, optimizer, objective, sharding.create_mesh(8), batch)
    assert remat is expected
    if limit is None:
        assert "no memory limit" in facts["reason"]
    else:
        # A real estimate: at least the parameters, their momentum and the gradients of a ~0.4M-parameter model.
        assert facts["step_bytes_without_remat"] > 3 * 4 * 0.3e6 and facts["device_bytes"] == limit


def test_auto_remat_decision_reaches_the_trained_model_and_the_export(tmp_path, monkeypatch):
    """model.remat="auto": choose_remat's decision, taken on the loader's own batch shapes, is the backbone flag the
    step is traced with (test_resnet checks that the flag puts every block under jax.checkpoint), and the export and
    the summary record it."""
    config = _tiny_demo_config(tmp_path)
    config.model.remat = "auto"
    backbone_flags, batches = [], []
    original_fit = training.fit

    def fit_recording_the_flag(**kwargs):
        backbone_flags.append(kwargs["model"].model.remat)
        return original_fit(**kwargs)

    def choose(model, optimizer, compute_loss, mesh, batch):
        batches.append(batch)
        return True, {"step_bytes": 1}

    monkeypatch.setattr(training, "fit", fit_recording_the_flag)
    monkeypatch.setattr(driver, "choose_remat", choose)
    paths = pipeline.Workdir(str(tmp_path / "run")).training("train_cam")
    summary = driver.train_and_export(_puzzle_task(config), config, "train_cam", paths, init_from="", seed=0)
    assert backbone_flags == [True]
    assert batches == [
        {
            "image": ((8, 64, 64, 3), np.dtype(np.uint8)),
            "image_box": ((8, 4), np.dtype(np.int32)),
            "labels": ((8, 5), np.dtype(np.float32)),
        }
    ]
    assert summary["remat"] is True and summary["remat_auto"] == {"step_bytes": 1}
    assert checkpointing.load_model_config(paths.export)["remat"] is True


def test_initialisation_from_an_export_reaches_the_trained_model(tmp_path, monkeypatch):
    """init_from copies the task's init parts (the backbone) before training starts, and leaves the head."""
    config = _tiny_demo_config(tmp_path)
    source_config = models.classifier_config(arch="resnet_tiny", num_classes=5, bn_mode="global")
    source = models.create_model(source_config, rngs=nnx.Rngs(7))
    _, params, stats = training.split_model(source)
    export = str(tmp_path / "source")
    checkpointing.export_model(export, params, stats, source_config)
    started_from = []
    monkeypatch.setattr(
        training, "fit", lambda **kwargs: started_from.append(training.split_model(kwargs["model"])[1]) or 1 / 0
    )
    paths = pipeline.Workdir(str(tmp_path / "run")).training("train_cam")
    with pytest.raises(ZeroDivisionError):
        driver.train_and_export(_puzzle_task(config), config, "train_cam", paths, init_from=export, seed=0)
    (trained,) = started_from
    np.testing.assert_array_equal(trained["model"]["conv1"]["kernel"], params["model"]["conv1"]["kernel"])
    assert not np.array_equal(trained["classifier"]["kernel"], params["classifier"]["kernel"])
    assert jnp.all(jnp.isfinite(trained["classifier"]["kernel"]))


def test_a_nan_names_the_stage_s_fields_that_fix_it(tmp_path, monkeypatch):
    config = _tiny_demo_config(tmp_path)

    def nan(**kwargs):
        raise FloatingPointError("The loss became nan at step 3; ... resumes from the newest (step 2).")

    monkeypatch.setattr(training, "fit", nan)
    paths = pipeline.Workdir(str(tmp_path / "run")).training("train_cam")
    with pytest.raises(FloatingPointError) as raised:
        driver.train_and_export(_puzzle_task(config), config, "train_cam", paths, init_from="", seed=0)
    message = str(raised.value)
    assert message.startswith("[train_cam] The loss became nan at step 3; ... resumes from the newest (step 2).")
    assert "Lower train_cam.learning_rate" in message and "--config.force_stages=train_cam" in message
