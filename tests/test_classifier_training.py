"""Tests of the classifier objectives and of initialisation from exported models."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import default
from puzzle_jax import checkpointing, classifier_training, training

NUM_CLASSES = 4


class _CountingCamModel(nnx.Module):
    """A linear CAM model (stride-4 conv + 1x1 head, no BN) that counts its calls, for exact expectations."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.model = nnx.Conv(3, 6, (4, 4), strides=(4, 4), use_bias=True, rngs=rngs)
        self.classifier = nnx.Conv(6, NUM_CLASSES, (1, 1), use_bias=False, rngs=rngs)
        self.calls = []

    def __call__(self, images):
        self.calls.append(images.shape)
        maps = self.classifier(jnp.tanh(self.model(images)))
        return maps.mean(axis=(1, 2)), maps


def _cam_config(**overrides):
    """The default config's Puzzle-CAM settings (the paper's), with ``overrides``."""
    cam = default.get_config().cam
    cam.update(overrides)
    return cam


def _soft_margin(logits, labels):
    logits = np.asarray(logits, np.float64)
    log_sigmoid = -np.log1p(np.exp(-logits))
    log_one_minus = -np.log1p(np.exp(logits))
    return -np.mean(labels * log_sigmoid + (1 - labels) * log_one_minus)


def _batch(size=32, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], np.float32)
    return {"image": rng.normal(size=(3, size, size, 3)).astype(np.float32), "labels": labels}


def test_puzzle_objective_is_the_sum_of_the_spec_terms():
    model = _CountingCamModel()
    batch = _batch()
    total_steps, step = 100, 20
    objective = classifier_training.create_puzzle_objective(_cam_config(), total_steps, output_stride=4)
    loss, metrics = objective(model, batch, jnp.asarray(step))

    # Independent expectation: the full pass, the four quadrants of each image as separate images.
    logits, maps = (np.asarray(a, np.float64) for a in model(jnp.asarray(batch["image"])))
    quadrant_maps = np.zeros_like(maps)
    half_image, half_map = 16, maps.shape[1] // 2
    for row in range(2):
        for column in range(2):
            quadrant = batch["image"][
                :,
                row * half_image : (row + 1) * half_image,
                column * half_image : (column + 1) * half_image,
            ]
            _, quadrant_map = model(jnp.asarray(quadrant))
            quadrant_maps[
                :,
                row * half_map : (row + 1) * half_map,
                column * half_map : (column + 1) * half_map,
            ] = np.asarray(quadrant_map)
    labels = batch["labels"]
    class_loss = _soft_margin(logits, labels)
    puzzle_class_loss = _soft_margin(quadrant_maps.mean(axis=(1, 2)), labels)
    masked = np.abs(maps - quadrant_maps) * labels[:, None, None, :]
    reconstruction = masked.mean()  # mean over all B*h*w*C elements (masking)
    alpha = min(4.0 * step / (total_steps * 0.5), 4.0)
    expected = class_loss + puzzle_class_loss + alpha * reconstruction
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reconstruction_loss"]), reconstruction, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["alpha"]), alpha, rtol=1e-6)


def test_plain_cam_option_runs_no_tiled_pass():
    model = _CountingCamModel()
    objective = classifier_training.create_puzzle_objective(_cam_config(loss_option="cl"), 10, output_stride=4)
    loss, metrics = objective(model, _batch(), jnp.asarray(0))
    assert model.calls == [(3, 32, 32, 3)]
    assert set(metrics) == {"class_loss"}
    np.testing.assert_allclose(float(loss), float(metrics["class_loss"]))


def test_sizes_not_divisible_by_grid_times_stride_are_padded():
    model = _CountingCamModel()
    objective = classifier_training.create_puzzle_objective(_cam_config(), 10, output_stride=4)
    loss, _ = objective(model, _batch(size=36), jnp.asarray(0))  # 36 is not a multiple of 2 x 4
    assert np.isfinite(float(loss))
    assert model.calls == [(3, 40, 40, 3), (12, 20, 20, 3)]


@pytest.mark.parametrize("objective_name", ["puzzle", "classification"])
def test_objectives_normalise_the_loaders_uint8_crops_like_the_host(objective_name):
    """A loader batch (uint8 crops + boxes) gives the loss of its host-normalised float batch."""
    from puzzle_jax.data import transforms

    rng = np.random.default_rng(3)
    crops = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 32, 32], [4, 0, 20, 32], [0, 6, 32, 19]], np.int32)
    normalised = np.zeros(crops.shape, np.float32)
    for crop, (top, left, height, width), out in zip(crops, boxes, normalised):
        out[top : top + height, left : left + width] = transforms.normalize_image(
            crop[top : top + height, left : left + width]
        )
    labels = _batch()["labels"]
    if objective_name == "puzzle":
        objective = classifier_training.create_puzzle_objective(_cam_config(), 10, output_stride=4)
    else:
        objective = classifier_training.create_classification_objective()
    loader_loss, _ = jax.jit(lambda batch: objective(_CountingCamModel(), batch, jnp.asarray(3)))(
        {"image": crops, "image_box": boxes, "labels": labels}
    )
    host_loss, _ = jax.jit(lambda batch: objective(_CountingCamModel(), batch, jnp.asarray(3)))(
        {"image": normalised, "labels": labels}
    )
    assert float(loader_loss) == float(host_loss)
    with pytest.raises(ValueError, match="image_box"):
        objective(_CountingCamModel(), {"image": crops, "labels": labels}, jnp.asarray(3))


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="cam.loss_option"):
        classifier_training.create_puzzle_objective(_cam_config(loss_option="cl_pcl_re_conf2"), 10, 16)
    with pytest.raises(ValueError, match="cam.level"):
        classifier_training.create_puzzle_objective(_cam_config(level="pixels"), 10, 16)
    config = ml_collections.ConfigDict(
        {
            "model": dict(
                arch="resnet_tiny",
                output_stride=16,
                bn_mode="global",
                bn_group_size=8,
                dtype="float16",
                remat=False,
            )
        }
    )
    with pytest.raises(ValueError, match="model.dtype"):
        classifier_training.model_config_from(config, 3)
    for remat in ("sometimes", 1):
        config = ml_collections.ConfigDict({"model": dict(config.model, dtype="float32", remat=remat)})
        with pytest.raises(ValueError, match="model.remat"):
            classifier_training.model_config_from(config, 3)
    # "auto" builds the model without remat; train_classifier decides.
    config = ml_collections.ConfigDict({"model": dict(config.model, remat="auto")})
    assert classifier_training.model_config_from(config, 3)["remat"] is False


@pytest.mark.parametrize(
    "limit,expected",
    [(None, False), (1, True), (1 << 50, False)],
    ids=["no-limit-reported", "tiny-device", "huge-device"],
)
def test_auto_remat_compares_the_steps_memory_estimate_with_the_device(monkeypatch, limit, expected):
    from puzzle_jax import optim, sharding

    monkeypatch.setattr(sharding, "device_memory_limit", lambda: limit)
    model = classifier_training.build_classifier(_model_config(NUM_CLASSES), seed=0)
    model.train()
    _, params, _ = training.split_model(model)
    optimizer = optim.create_optimizer(params, learning_rate=0.1, weight_decay=1e-4, total_steps=10)
    objective = classifier_training.create_puzzle_objective(_cam_config(), 10, output_stride=16)
    remat, facts = classifier_training.choose_remat(
        model, optimizer, objective, sharding.create_mesh(8), global_batch_size=8, crop_size=64,
        num_classes=NUM_CLASSES,
    )
    assert remat is expected
    if limit is None:
        assert "no memory limit" in facts["reason"]
    else:
        # A real estimate: at least the parameters, their momentum and the gradients of a ~0.4M-parameter model.
        assert facts["step_bytes_without_remat"] > 3 * 4 * 0.3e6 and facts["device_bytes"] == limit


def _model_config(num_classes):
    return {
        "arch": "resnet_tiny",
        "num_classes": num_classes,
        "output_stride": 16,
        "bn_mode": "global",
        "bn_group_size": None,
        "dtype": "float32",
        "remat": False,
    }


def test_export_then_initialise_backbone_only_or_with_head(tmp_path):
    source = classifier_training.build_classifier(_model_config(NUM_CLASSES), seed=1)
    _, params, stats = training.split_model(source)
    # Make the batch statistics non-trivial so that copying them is observable.
    stats = jax.tree.map(lambda x: x + 0.5, stats)
    export = str(tmp_path / "export")
    checkpointing.export_model(export, params, stats, _model_config(NUM_CLASSES))

    target = classifier_training.build_classifier(_model_config(NUM_CLASSES), seed=2)
    _, head_before, _ = training.split_model(target)
    head_before = np.asarray(head_before["classifier"]["kernel"])
    classifier_training.initialise_from(target, export, include_head=False)
    _, new_params, new_stats = training.split_model(target)
    for a, b in zip(jax.tree.leaves(params["model"]), jax.tree.leaves(new_params["model"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(stats["model"]), jax.tree.leaves(new_stats["model"])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(new_params["classifier"]["kernel"], head_before)

    classifier_training.initialise_from(target, export, include_head=True)
    _, with_head, _ = training.split_model(target)
    np.testing.assert_array_equal(with_head["classifier"]["kernel"], params["classifier"]["kernel"])

    other_classes = classifier_training.build_classifier(_model_config(NUM_CLASSES + 2), seed=2)
    with pytest.raises(ValueError, match="init_from"):
        classifier_training.initialise_from(other_classes, export, include_head=True)
    # The backbone alone still fits a model with another number of classes (ImageNet -> VOC).
    classifier_training.initialise_from(other_classes, export, include_head=False)


def test_load_exported_classifier_reproduces_outputs(tmp_path):
    source = classifier_training.build_classifier(_model_config(NUM_CLASSES), seed=4)
    source.eval()
    _, params, stats = training.split_model(source)
    export = str(tmp_path / "export")
    checkpointing.export_model(export, params, stats, _model_config(NUM_CLASSES))
    loaded, model_config = classifier_training.load_exported_classifier(export)
    assert model_config == _model_config(NUM_CLASSES)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 48, 48, 3)), jnp.float32)
    np.testing.assert_allclose(np.asarray(loaded(images)[1]), np.asarray(source(images)[1]), rtol=1e-6)


def test_auto_remat_decision_reaches_the_trained_model_and_the_export(tmp_path, monkeypatch):
    """model.remat="auto": choose_remat's decision is the backbone flag the step is traced with (test_resnet checks
    that the flag puts every block under jax.checkpoint), and the export and the summary record it."""
    import importlib

    config = importlib.import_module("configs.demo").get_config()
    config.data.data_dir = str(tmp_path / "data")
    config.data.builder_kwargs = ml_collections.ConfigDict(dict(num_pretrain=2, num_train=8, num_val=2))
    config.data.crop_size = 64
    config.data.rescale_range = (48, 80)
    config.model.init_from = ""
    config.model.remat = "auto"
    backbone_flags = []
    original_fit = training.fit

    def fit_recording_the_flag(**kwargs):
        backbone_flags.append(kwargs["model"].model.remat)
        return original_fit(**kwargs)

    monkeypatch.setattr(training, "fit", fit_recording_the_flag)
    monkeypatch.setattr(classifier_training, "choose_remat", lambda *args, **kwargs: (True, {"step_bytes": 1}))
    summary = classifier_training.train_classifier(
        config, str(tmp_path / "train_cam"), split="train", batch_size=8, epochs=1, learning_rate=0.01,
        objective="puzzle", init_from="", seed=0,
    )
    assert backbone_flags == [True]
    assert summary["remat"] is True and summary["remat_auto"] == {"step_bytes": 1}
    assert checkpointing.load_model_config(str(tmp_path / "train_cam" / "model"))["remat"] is True
