"""Tests of the segmenter's training and its stages: the task (what it tells the driver), the optimizer groups and
frozen BatchNorm in a real step, the ``train_seg`` -> ``infer_seg`` -> ``eval_seg`` chain end to end on a tiny demo
workdir (ground-truth labels, a label folder, the missing-folder error), and a resumed ``train_seg``."""

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
from puzzle_jax import checkpointing, labels, models, optim, pipeline, training
from puzzle_jax.data import datasets, input_pipeline
from puzzle_jax.stages import eval_seg, infer_seg, train_seg
from puzzle_jax.tasks import segmentation


def _model_section(**overrides):
    section = default.get_config().model
    section.update(dict(arch="resnet_tiny"), **overrides)
    return section


def test_segmentation_task_tells_the_driver_what_it_builds_and_trains(tmp_path):
    config = default.get_config()
    task = segmentation.SegmentationTask(
        _model_section(dtype="bfloat16"), config.seg, str(tmp_path), produced_by="test", seed=0
    )
    assert task.model_config(types.SimpleNamespace(num_classes=20)) == models.segmentation_config(
        arch="resnet_tiny", num_classes=21, use_gn=True, dtype="bfloat16"
    )
    assert task.init_parts(config.train_seg) == ("model",)
    transform = task.create_transform(config.train_seg)
    assert isinstance(transform, input_pipeline.SegmentationAugmentation)
    assert (transform.crop_size, transform.rescale_range) == (512, (256, 1024))


def test_default_and_demo_sections_follow_the_authors():
    section = default.get_config().train_seg
    assert (section.batch_size, section.epochs, section.learning_rate, section.weight_decay) == (32, 50, 0.007, 4e-5)
    assert (section.crop_size, tuple(section.rescale_range), section.poly_power) == (512, (256, 1024), 0.9)
    seg = default.get_config().seg
    assert (seg.labels, seg.use_gn, tuple(seg.scales), seg.flip, seg.crf_iterations) == (
        "pseudo_labels",
        True,
        (0.5, 1.0, 1.5, 2.0),
        True,
        10,
    )
    stages = list(default.get_config().stages)
    assert stages[-3:] == ["train_seg", "infer_seg", "eval_seg"] and list(pipeline.STAGES)[-3:] == stages[-3:]
    demo = importlib.import_module("configs.demo").get_config()
    assert (demo.train_seg.split, demo.train_seg.init_from, demo.seg.split) == ("train", "pretrain", "val")
    assert demo.stages[0] == "pretrain" and demo.stages[-1] == "eval_seg"


def test_a_step_trains_the_head_ten_times_faster_and_keeps_batchnorm_statistics(tmp_path):
    """One SGD step of the task's objective and optimizer from a zero momentum: the head's weights move by 10x the
    learning rate times their gradient (+ decay), the backbone's by 1x, and no BatchNorm statistic changes (the
    backbone's BatchNorm is frozen, the head's is GroupNorm)."""
    task = segmentation.SegmentationTask(_model_section(), default.get_config().seg, "", produced_by="test", seed=3)
    section = default.get_config().train_seg
    section.update(crop_size=48, rescale_range=(40, 56), batch_size=2, momentum_mode="standard", momentum=0.0)
    section.update(nesterov=False, weight_decay=0.0)
    model = models.create_model(task.model_config(types.SimpleNamespace(num_classes=2)), rngs=nnx.Rngs(0))
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
        element = {"image": rng.integers(0, 255, (48, 48, 3)).astype(np.uint8), "mask": mask, "labels": np.zeros(2)}
        examples.append(transform.random_map(element, np.random.default_rng(index)))
    batch = {name: np.stack([example[name] for example in examples]) for name in ("image", "image_box", "mask")}

    def loss_of(params):
        return compute_loss(training.merge_model(graphdef, params, batch_stats), batch, 0)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(params)
    assert np.isfinite(float(loss)) and 0 < float(metrics["labelled_fraction"]) <= 1
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    multipliers = {"pretrained_weight": 1, "pretrained_bias": 2, "scratch_weight": 10, "scratch_bias": 20}
    seen = set()
    for path, gradient in jax.tree_util.tree_flatten_with_path(grads)[0]:
        group = optim.parameter_group(path)
        seen.add(group)
        update = np.asarray(_leaf(updates, path))
        np.testing.assert_allclose(update, -0.007 * multipliers[group] * np.asarray(gradient), rtol=1e-4, atol=1e-9)
    assert seen == set(multipliers)
    stats_after = nnx.state(training.merge_model(graphdef, params, batch_stats), nnx.BatchStat)
    for before, after in zip(jax.tree.leaves(batch_stats), jax.tree.leaves(nnx.to_pure_dict(stats_after))):
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


def _leaf(tree, path):
    for entry in path:
        tree = tree[getattr(entry, "key", getattr(entry, "idx", entry))]
    return tree


def _tiny_config(tmp_path, **train_seg):
    """The demo config on a tiny demo dataset; train_seg at 64 px from scratch on the ground truth."""
    config = importlib.import_module("configs.demo").get_config()
    config.data.data_dir = str(tmp_path / "data")
    config.data.builder_kwargs = ml_collections.ConfigDict(dict(num_pretrain=2, num_train=8, num_val=4))
    config.train_seg.update(
        dict(init_from="", crop_size=64, rescale_range=(56, 72), batch_size=8, epochs=1, log_every_steps=1),
        **train_seg,
    )
    config.seg.update(labels="ground_truth", scales=(0.5, 1.0), crf_iterations=1, workers=1)
    config.eval.gallery_images = 2
    return config


def test_train_seg_on_pseudo_labels_needs_the_pseudo_label_folder(tmp_path):
    config = _tiny_config(tmp_path)
    config.seg.labels = "pseudo_labels"
    with pytest.raises(FileNotFoundError, match="pseudo_labels stage"):
        train_seg.run(config, pipeline.Workdir(str(tmp_path / "run")))


def test_train_infer_and_eval_seg_learn_from_the_labels_and_score_val(tmp_path):
    """Trained on a label folder (the split's ground truth written as PNGs, as the pseudo labels would be), the loss
    falls, the export is a segmenter, infer_seg writes a label PNG per val image, eval_seg scores them with the chain
    and the gallery."""
    config = _tiny_config(tmp_path, epochs=15, validate_every_epochs=5)
    workdir = pipeline.Workdir(str(tmp_path / "run"))
    records, _ = datasets.load_split_from_config(config.data, "train")
    label_dir = str(tmp_path / "labels")
    for record in records:
        labels.write_label_png(os.path.join(label_dir, f"{record['id']}.png"), record["mask"])
    config.seg.labels = label_dir
    summary = train_seg.run(config, workdir)
    assert (summary["final_step"], summary["images"], summary["label_dir"]) == (15, 8, label_dir)
    losses = np.array([json.loads(line)["loss"] for line in open(workdir.training("train_seg").metrics)])
    assert losses[-3:].mean() < 0.8 * losses[:3].mean(), losses
    assert 0 <= summary["validation_miou"] <= 100 and summary["validation_images"] == 4
    # Scored every 5 epochs (one step each) for the log; the last equals the assessment after training.
    validation = [json.loads(line) for line in open(workdir.training("train_seg").validation_metrics)]
    assert [record["step"] for record in validation] == [5, 10, 15]
    assert validation[-1]["miou"] == pytest.approx(summary["validation_miou"], abs=1e-6)
    model, model_config = checkpointing.load_exported(workdir.exported_model("train_seg"), family="segmentation")
    # The demo's 5 classes and background.
    assert model_config["num_classes"] == 6 and model(np.zeros((1, 45, 61, 3), np.float32)).shape == (1, 45, 61, 6)

    inferred = infer_seg.run(config, workdir)
    assert (inferred["written"], inferred["split"]) == (4, "val")
    val, _ = datasets.load_split_from_config(config.data, "val")
    for record in val:
        prediction = labels.read_label_png(os.path.join(workdir.segmentation_dir("val"), f"{record['id']}.png"), 5)
        assert prediction.shape == record["mask"].shape
    scored = eval_seg.run(config, workdir)
    assert scored["num_images"] == 4 and 0 <= scored["miou"] <= 100 and len(scored["per_class_iou"]) == 6
    assert scored["chain"][-1][:2] == ("segmentation", scored["miou"])
    assert os.path.exists(scored["gallery"])


def test_a_resumed_train_seg_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """Stopped after 2 of 4 steps and run again, the stage exports the model an uninterrupted run exports: the
    dropout masks are a function of the step, so the resumed steps draw the same ones."""
    config = _tiny_config(tmp_path, epochs=4, validate_every_epochs=1)
    uninterrupted, resumed = (pipeline.Workdir(str(tmp_path / name)) for name in ("uninterrupted", "resumed"))
    train_seg.run(config, uninterrupted)
    fit = training.fit
    monkeypatch.setattr(training, "fit", lambda **kwargs: fit(**kwargs, stop_after_steps=2))
    with pytest.raises(training.Preempted):
        train_seg.run(config, resumed)
    monkeypatch.undo()
    summary = train_seg.run(config, resumed)
    assert (summary["start_step"], summary["final_step"]) == (2, 4)
    # Each step's validation score appears once, and as the uninterrupted run's.
    scores = [
        [json.loads(line) for line in open(workdir.training("train_seg").validation_metrics)]
        for workdir in (uninterrupted, resumed)
    ]
    assert [record["step"] for record in scores[1]] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["miou"] for r in scores[1]], [r["miou"] for r in scores[0]], atol=1e-4)
    expected, _ = checkpointing.load_exported(uninterrupted.exported_model("train_seg"), family="segmentation")
    actual, _ = checkpointing.load_exported(resumed.exported_model("train_seg"), family="segmentation")
    for a, b in zip(jax.tree.leaves(nnx.state(actual)), jax.tree.leaves(nnx.state(expected)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_voc_test_predictions_are_laid_out_for_the_evaluation_server(tmp_path):
    """The server takes results/VOC2012/Segmentation/comp6_test_cls/<id>.png in a tar archive."""
    import tarfile

    predictions = tmp_path / "infer_seg" / "test"
    for image_id in ("2008_000001", "2008_000002"):
        labels.write_label_png(str(predictions / f"{image_id}.png"), np.full((5, 7), 3, np.uint8))
    archive = infer_seg.write_voc_submission(str(predictions), str(tmp_path / "submission"))
    with tarfile.open(archive) as tar:
        names = sorted(name for name in tar.getnames() if name.endswith(".png"))
        assert names == [f"results/VOC2012/Segmentation/comp6_test_cls/2008_00000{i}.png" for i in (1, 2)]
        extracted = tar.extractfile(names[0]).read()
    assert extracted == (predictions / "2008_000001.png").read_bytes()
