"""Tests for puzzle_jax.models.classifier and create_classifier."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch_reference import random_images

from puzzle_jax.models import Classifier, create_classifier


@pytest.fixture(scope="module")
def classifier():
    return create_classifier("resnet_tiny", 20, rngs=nnx.Rngs(0))


def test_outputs_are_class_maps_and_their_spatial_mean(classifier):
    logits, class_maps = classifier(jnp.asarray(random_images(batch=2, size=64)))
    assert isinstance(classifier, Classifier)
    assert logits.shape == (2, 20) and logits.dtype == jnp.float32
    assert class_maps.shape == (2, 4, 4, 20)  # output stride 16
    np.testing.assert_allclose(logits, class_maps.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    assert float(class_maps.min()) < 0  # raw maps, no ReLU


def test_head_is_a_bias_free_kaiming_normal_1x1_conv():
    model = create_classifier("resnet50", 20, rngs=nnx.Rngs(0))
    head = model.classifier
    assert head.bias is None
    kernel = np.asarray(head.kernel[...])
    assert kernel.shape == (1, 1, 2048, 20)
    # torch.nn.init.kaiming_normal_ default: fan_in = 2048, gain sqrt(2).
    assert abs(kernel.std() / np.sqrt(2.0 / 2048) - 1) < 0.05


def test_parameter_paths_follow_the_authors_keys(classifier):
    graphdef, params, batch_stats = nnx.split(classifier, nnx.Param, nnx.BatchStat)
    roots = {path[0] for path, _ in nnx.to_flat_state(params)}
    assert roots == {"model", "classifier"}
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert {"model/conv1/kernel", "model/layer4/0/bn3/scale", "classifier/kernel"} <= paths
    assert all(path[0] == "model" for path, _ in nnx.to_flat_state(batch_stats))


def test_bfloat16_classifier_returns_float32_logits():
    model = create_classifier("resnet_tiny", 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    logits, class_maps = model(jnp.asarray(random_images(batch=4, size=32)))  # shapes of test_resnet.py
    assert logits.dtype == jnp.float32 and class_maps.dtype == jnp.bfloat16


@pytest.mark.parametrize("num_classes", [0, 2.5])
def test_rejects_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        create_classifier("resnet_tiny", num_classes, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_authors_checkpoint_gives_the_authors_class_maps(tmp_path):
    """An authors'-format checkpoint (backbone under ``model.``, stage aliases, head, DataParallel prefix),
    read from a .pth file, gives the class maps of the torch transcription of Classifier.forward(with_cam=True)."""
    import torch
    from torch_reference import relative_error, torch_resnest

    from benchmarks.authors_torch import Classifier as AuthorsClassifier
    from puzzle_jax.weights import load_torch_weights

    reference = AuthorsClassifier(torch_resnest("resnest50", 16), num_classes=20).eval()
    state_dict = {f"module.{key}": value for key, value in reference.state_dict().items()}
    assert any(key.startswith("module.stage1.") for key in state_dict)
    path = tmp_path / "ResNeSt50@Puzzle.pth"
    torch.save(state_dict, path)

    images = random_images(batch=2, size=64)
    with torch.no_grad():
        expected_logits, expected_maps = reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))

    model = nnx.eval_shape(lambda: create_classifier("resnest50", 20, rngs=nnx.Rngs(0)))
    result = load_torch_weights(model, path, arch="resnest50")
    assert result["initialised"] == []
    assert "classifier.weight" in result["loaded"]
    assert any(key.startswith("stage5.") for key in result["dropped"])
    model.eval()
    logits, class_maps = nnx.jit(lambda module, batch: module(batch))(model, jnp.asarray(images))
    assert relative_error(class_maps, expected_maps.permute(0, 2, 3, 1).numpy()) < 1e-4
    assert relative_error(logits, expected_logits.numpy()) < 1e-4
