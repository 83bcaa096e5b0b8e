"""Tests of AffinityNet's training: the task (what it tells the driver, only the edge layers learn) and the
``train_aff`` stage end to end on a tiny demo workdir whose affinity labels are the split's ground-truth masks."""

import importlib
import json
import os
import types

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import default
from puzzle_jax import checkpointing, labels, models, pipeline, training
from puzzle_jax.data import datasets, input_pipeline
from puzzle_jax.stages import train_aff
from puzzle_jax.tasks import affinity as affinity_task


def _model_section(**overrides):
    section = default.get_config().model
    section.update(dict(arch="resnet_tiny"), **overrides)
    return section


def test_affinity_task_tells_the_driver_what_it_builds_and_trains(tmp_path):
    task = affinity_task.AffinityTask(_model_section(dtype="bfloat16"), str(tmp_path), radius=10)
    assert not task.remat_auto
    assert task.model_config(types.SimpleNamespace(num_classes=20)) == {
        "family": "affinity",
        "arch": "resnet_tiny",
        "dtype": "bfloat16",
        "remat": False,
    }
    section = default.get_config().train_aff
    assert task.init_parts(section) == ("model",)
    transform = task.create_transform(section)
    assert isinstance(transform, input_pipeline.AffinityAugmentation)
    assert (transform.crop_size, transform.rescale_range, transform.label_stride) == (512, (320, 640), 4)


def test_default_and_demo_sections_follow_the_authors():
    section = default.get_config().train_aff
    assert (section.batch_size, section.epochs, section.learning_rate, section.weight_decay) == (32, 3, 0.1, 1e-4)
    assert (section.crop_size, tuple(section.rescale_range), section.radius) == (512, (320, 640), 10)
    assert section.init_from == "" and section.split == "train_aug"
    demo = importlib.import_module("configs.demo").get_config().train_aff
    assert (demo.split, demo.init_from, demo.batch_size, demo.crop_size) == ("train", "pretrain", 16, 128)
    # The demo's images and crops are a quarter of VOC's, and so are its radii in stride-4 cells.
    assert demo.radius == 3 and importlib.import_module("configs.demo").get_config().refine.rw_radius == 2
    stages = list(pipeline.STAGES)
    assert stages.index("eval_cam") < stages.index("train_aff")


def test_a_step_changes_only_the_edge_layers(tmp_path):
    """One optimizer step of the task's objective and optimizer: every edge parameter moves, no backbone parameter
    and no BatchNorm statistic does (weight decay included)."""
    task = affinity_task.AffinityTask(_model_section(), str(tmp_path), radius=5)
    section = default.get_config().train_aff
    section.update(crop_size=48, rescale_range=(40, 56), batch_size=2)
    model = models.create_model(task.model_config(None), rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, batch_stats = training.split_model(model)
    optimizer = task.create_optimizer(params, section, total_steps=10)
    compute_loss = task.create_objective(section, total_steps=10)
    rng = np.random.default_rng(0)
    transform = task.create_transform(section)
    examples = []
    for index in range(2):
        mask = np.zeros((48, 48), np.uint8)
        mask[10:30, 12:40] = index + 1
        image = rng.integers(0, 255, (48, 48, 3)).astype(np.uint8)
        element = {"image": image, "mask": mask, "labels": np.zeros(3, np.float32)}
        examples.append(transform.random_map(element, np.random.default_rng(index)))
    batch = {name: np.stack([example[name] for example in examples]) for name in examples[0]}
    del batch["labels"]

    def loss_of(params):
        return compute_loss(training.merge_model(graphdef, params, batch_stats), batch, 0)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(params)
    assert np.isfinite(float(loss)) and float(metrics["negative_pairs"]) > 0
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    new_params = jax.tree.map(lambda p, u: p + u, params, updates)
    stats_after = nnx.state(training.merge_model(graphdef, new_params, batch_stats), nnx.BatchStat)
    for path, before in jax.tree_util.tree_flatten_with_path(params)[0]:
        after = _leaf(new_params, path)
        name = getattr(path[0], "key", path[0])
        if name == "model":
            np.testing.assert_array_equal(np.asarray(after), np.asarray(before), err_msg=str(path))
        else:
            assert np.any(np.asarray(after) != np.asarray(before)), path
    for before, after in zip(jax.tree.leaves(batch_stats), jax.tree.leaves(nnx.to_pure_dict(stats_after))):
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


def _leaf(tree, path):
    for entry in path:
        tree = tree[getattr(entry, "key", getattr(entry, "idx", entry))]
    return tree


def _tiny_config(tmp_path, **train_aff):
    """The demo config on a tiny demo dataset; train_aff at 80 px (a 20 x 20 label grid, radius 10) from scratch."""
    config = importlib.import_module("configs.demo").get_config()
    config.data.data_dir = str(tmp_path / "data")
    config.data.builder_kwargs = ml_collections.ConfigDict(dict(num_pretrain=2, num_train=8, num_val=2))
    config.train_aff.update(
        dict(
            init_from="", crop_size=80, rescale_range=(72, 96), batch_size=8, epochs=1, log_every_steps=1, radius=10
        ),
        **train_aff,
    )
    return config


def _write_ground_truth_labels(config, workdir):
    """The split's ground-truth masks as the affinity labels (meaningful labels without the CAM stages)."""
    records, _ = datasets.load_split_from_config(config.data, config.train_aff.split, decode_masks=True)
    for record in records:
        labels.write_label_png(os.path.join(workdir.affinity_label_dir(), f"{record['id']}.png"), record["mask"])


def test_train_aff_needs_the_affinity_labels(tmp_path):
    config = _tiny_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="aff_labels stage"):
        train_aff.run(config, pipeline.Workdir(str(tmp_path / "run")))


def test_train_aff_learns_from_the_labels_and_exports_an_affinity_net(tmp_path):
    config = _tiny_config(tmp_path, epochs=12)
    workdir = pipeline.Workdir(str(tmp_path / "run"))
    _write_ground_truth_labels(config, workdir)
    summary = train_aff.run(config, workdir)
    assert (summary["final_step"], summary["images"], summary["radius"]) == (12, 8, 10)
    records = [json.loads(line) for line in open(workdir.training("train_aff").metrics)]
    assert [record["step"] for record in records] == list(range(1, 13))
    assert all(record["fg_positive_pairs"] > 0 and record["negative_pairs"] > 0 for record in records)
    # The loss fell (0.685 -> 0.624 over the first and last three steps when written).
    losses = np.array([record["loss"] for record in records])
    assert losses[-3:].mean() < 0.95 * losses[:3].mean(), losses
    assert set(summary["first_tenth_metrics"]) >= set(affinity_task.ASSESSED_TERMS)
    model, model_config = checkpointing.load_exported(workdir.exported_model("train_aff"), family="affinity")
    assert isinstance(model, models.AffinityNet) and model_config == models.affinity_config(arch="resnet_tiny")
    assert model(np.zeros((1, 80, 80, 3), np.float32)).shape == (1, 20, 20)


def test_a_resumed_train_aff_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """Stopped after 2 of 4 steps and run again, the stage exports the model an uninterrupted run exports (the
    frozen-backbone optimizer's state is checkpointed and restored like any other)."""
    config = _tiny_config(tmp_path, epochs=4)
    uninterrupted, resumed = (pipeline.Workdir(str(tmp_path / name)) for name in ("uninterrupted", "resumed"))
    for workdir in (uninterrupted, resumed):
        _write_ground_truth_labels(config, workdir)
    train_aff.run(config, uninterrupted)
    fit = training.fit
    monkeypatch.setattr(training, "fit", lambda **kwargs: fit(**kwargs, stop_after_steps=2))
    with pytest.raises(training.Preempted):
        train_aff.run(config, resumed)
    monkeypatch.undo()
    summary = train_aff.run(config, resumed)
    assert (summary["start_step"], summary["final_step"]) == (2, 4)
    expected, _ = checkpointing.load_exported(uninterrupted.exported_model("train_aff"), family="affinity")
    actual, _ = checkpointing.load_exported(resumed.exported_model("train_aff"), family="affinity")
    for a, b in zip(jax.tree.leaves(nnx.state(actual)), jax.tree.leaves(nnx.state(expected)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_a_crop_too_small_for_the_radius_names_the_fields(tmp_path):
    section = ml_collections.ConfigDict(dict(crop_size=64, rescale_range=(48, 96)))
    model_section = ml_collections.ConfigDict(dict(arch="resnet_tiny", dtype="float32"))
    task = affinity_task.AffinityTask(model_section, str(tmp_path), 10)
    with pytest.raises(ValueError, match=r"train_aff.crop_size=64 .*16x16.*radius 10.*76 or more"):
        task.create_transform(section)
    assert task.create_transform(ml_collections.ConfigDict(dict(crop_size=76, rescale_range=(48, 96)))) is not None
