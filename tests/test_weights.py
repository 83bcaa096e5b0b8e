"""Tests for puzzle_jax.weights: key mapping, formats, errors, and the convert command line.

Parity with real torch networks is tested in test_resnet.py, test_resnest.py and test_classifier.py; here the
small ``resnet_tiny`` keeps every case fast, with state dicts written in the torch layout by ``_torch_layout``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from puzzle_jax.models import create_backbone, create_classifier
from puzzle_jax.weights import WeightLoadingError, load_torch_weights, read_state_dict
from puzzle_jax.weights.convert import main


def _torch_layout(model, prefix="") -> dict[str, torch.Tensor]:
    """The state dict a torch twin of ``model`` would have (conv OIHW, BN weight/bias/running_*)."""
    state = {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        module = prefix + ".".join(map(str, path[:-1]))
        value = np.asarray(variable[...])
        leaf = path[-1]
        if leaf == "kernel":
            state[f"{module}.weight"] = torch.from_numpy(value.transpose(3, 2, 0, 1).copy())
        elif leaf == "bias":
            state[f"{module}.bias"] = torch.from_numpy(value.copy())
        else:
            name = {"scale": "weight", "mean": "running_mean", "var": "running_var"}[leaf]
            state[f"{module}.{name}"] = torch.from_numpy(value.copy())
            state[f"{module}.num_batches_tracked"] = torch.tensor(7)
    return state


def _randomized(model, seed):
    rng = np.random.RandomState(seed)
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda v: jnp.asarray(rng.randn(*v.shape).astype(np.float32)), state))
    return model


def _assert_same_variables(a, b, root=()):
    flat_a = dict(nnx.to_flat_state(nnx.state(a)))
    flat_b = dict(nnx.to_flat_state(nnx.state(b)))
    for path, value in flat_a.items():
        np.testing.assert_array_equal(value[...], flat_b[root + path][...], err_msg=str(path))


@pytest.fixture(scope="module")
def source():
    return _randomized(create_backbone("resnet_tiny", bn_mode="global", rngs=nnx.Rngs(1)), seed=3)


def test_imagenet_layout_round_trip_drops_fc_and_counters(source):
    state_dict = _torch_layout(source)
    state_dict["fc.weight"] = torch.zeros(1000, 512)
    state_dict["fc.bias"] = torch.zeros(1000)
    target = create_backbone("resnet_tiny", rngs=nnx.Rngs(2))
    result = load_torch_weights(target, state_dict, arch="resnet_tiny")
    _assert_same_variables(source, target)
    assert {"fc.weight", "fc.bias", "bn1.num_batches_tracked"} <= set(result["dropped"])
    assert result["initialised"] == []
    # The ResNeSt-style keys: downsample.0 is the conv in ResNet, conv1 a plain conv.
    assert "layer1.0.downsample.0.weight" in result["loaded"]


def test_loading_into_an_abstract_model_fills_every_variable(source):
    target = nnx.eval_shape(lambda: create_backbone("resnet_tiny", rngs=nnx.Rngs(0)))
    load_torch_weights(target, _torch_layout(source))
    assert all(isinstance(v[...], jax.Array) for _, v in nnx.to_flat_state(nnx.state(target)))
    _assert_same_variables(source, target)


def test_errors_list_unknown_missing_and_misshaped_keys(source):
    state_dict = _torch_layout(source)
    state_dict["layer9.0.conv1.weight"] = torch.zeros(1)
    del state_dict["layer2.0.bn3.running_var"]
    state_dict["layer3.0.conv2.weight"] = state_dict["layer3.0.conv2.weight"][:, :-1]
    with pytest.raises(WeightLoadingError) as error:
        load_torch_weights(create_backbone("resnet_tiny", rngs=nnx.Rngs(0)), state_dict, arch="resnet_tiny")
    message = str(error.value)
    assert "resnet_tiny" in message
    assert "unexpected keys (no matching model variable) (1):\n  layer9.0.conv1.weight" in message
    assert "missing (model variables without a value) (1):\n  layer2/0/bn3/var" in message
    assert "shape mismatches (1):\n  layer3.0.conv2.weight: checkpoint (64, 63, 3, 3) vs model (64, 64, 3, 3)" in (
        message
    )


def test_wrong_architecture_is_rejected(source):
    with pytest.raises(WeightLoadingError, match="missing"):
        load_torch_weights(create_backbone("resnet50", rngs=nnx.Rngs(0)), _torch_layout(source))


def test_authors_format_into_classifier_and_into_backbone(source):
    classifier_source = create_classifier("resnet_tiny", 5, rngs=nnx.Rngs(4))
    nnx.update(classifier_source.model, nnx.state(source))
    state_dict = _torch_layout(classifier_source)  # model.* and classifier.weight
    # The authors' nn.Sequential aliases of the backbone: the same tensors under stage1..5.
    state_dict.update({f"stage1.0.{k[len('model.conv1.'):]}": v for k, v in state_dict.items()
                       if k.startswith("model.conv1.")})
    state_dict.update({f"stage5.0.{k[len('model.layer4.'):]}": v for k, v in state_dict.items()
                       if k.startswith("model.layer4.")})
    wrapped = {f"module.{key}": value for key, value in state_dict.items()}

    classifier = create_classifier("resnet_tiny", 5, rngs=nnx.Rngs(9))
    result = load_torch_weights(classifier, wrapped)
    _assert_same_variables(classifier_source, classifier)
    assert "classifier.weight" in result["loaded"] and result["initialised"] == []
    assert any(key.startswith("stage1.") for key in result["dropped"])

    backbone = create_backbone("resnet_tiny", rngs=nnx.Rngs(9))
    result = load_torch_weights(backbone, state_dict)
    _assert_same_variables(source, backbone)
    assert "classifier.weight" in result["dropped"]


def test_authors_format_without_head_is_an_error(source):
    state_dict = {f"model.{key}": value for key, value in _torch_layout(source).items()}
    with pytest.raises(WeightLoadingError, match="classifier/kernel"):
        load_torch_weights(create_classifier("resnet_tiny", 5, rngs=nnx.Rngs(0)), state_dict)


def test_imagenet_weights_into_classifier_keep_the_head(source):
    classifier = create_classifier("resnet_tiny", 5, rngs=nnx.Rngs(0))
    head = np.asarray(classifier.classifier.kernel[...])
    result = load_torch_weights(classifier, _torch_layout(source))
    assert result["initialised"] == ["classifier/kernel"]
    np.testing.assert_array_equal(classifier.classifier.kernel[...], head)
    _assert_same_variables(source, classifier.model)


def test_read_state_dict_from_files_and_wrappers(source, tmp_path):
    state_dict = _torch_layout(source)
    path = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": state_dict}, path)
    arrays = read_state_dict(path)
    assert set(arrays) == set(state_dict)
    np.testing.assert_array_equal(arrays["conv1.weight"], state_dict["conv1.weight"].numpy())


def test_read_state_dict_from_safetensors(source, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    arrays = {key: value.numpy() for key, value in _torch_layout(source).items()}
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(arrays, str(path))
    target = create_backbone("resnet_tiny", rngs=nnx.Rngs(0))
    load_torch_weights(target, path)
    _assert_same_variables(source, target)


def test_convert_command_writes_a_model_that_init_from_loads(source, tmp_path, capsys):
    from puzzle_jax import checkpointing

    path = tmp_path / "resnet_tiny-imagenet.pth"
    torch.save(_torch_layout(source), path)
    output = tmp_path / "exported"
    assert main(["--arch", "resnet_tiny", "--input", str(path), "--output", str(output)]) == 0
    assert "freshly initialised (not in the checkpoint): classifier/kernel" in capsys.readouterr().out

    config = checkpointing.load_model_config(str(output))
    assert config == {
        "family": "classifier", "arch": "resnet_tiny", "num_classes": 20, "output_stride": 16, "bn_mode": "frozen",
        "bn_group_size": None, "dtype": "float32", "remat": False, "bn_statistics": "two_pass",
        "grouped_conv": "grouped",
    }
    model = create_classifier("resnet_tiny", 20, rngs=nnx.Rngs(0))
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats, _ = checkpointing.load_exported_model(
        str(output), {"params": nnx.as_pure(params), "batch_stats": nnx.as_pure(batch_stats)}
    )
    nnx.update(model, params, batch_stats)
    _assert_same_variables(source, model.model)

    # What a training section's init_from does with it (the driver's initialisation).
    trained = create_classifier("resnet_tiny", 20, bn_mode="global", rngs=nnx.Rngs(5))
    checkpointing.initialise_from_export(trained, str(output), ("model",), field="train_cam.init_from")
    _assert_same_variables(source, trained.model)


def test_convert_command_reports_bad_checkpoints(source, tmp_path, capsys):
    state_dict = _torch_layout(source)
    del state_dict["conv1.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state_dict, path)
    assert main(["--arch", "resnet_tiny", "--input", str(path), "--output", str(tmp_path / "out")]) == 1
    assert "model/conv1/kernel" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["--arch", "resnet_tiny", "--input", str(path), "--output", str(tmp_path)])


@pytest.mark.slow
def test_converted_official_resnest50_initialises_training_and_trains_a_step(tmp_path):
    """Issue 3's end point: official ResNeSt-50 file -> convert CLI -> train_cam.init_from -> one train step."""
    import ml_collections
    from resnest.torch import resnest50

    from puzzle_jax import checkpointing, models, objectives, optim, sharding, training

    torch.manual_seed(0)
    official = resnest50(pretrained=False, dilation=2)  # the authors' OS16 construction
    path = tmp_path / "resnest50-official.pth"
    torch.save(official.state_dict(), path)  # with the ImageNet fc.* keys, as downloaded
    output = tmp_path / "weights_resnest50"
    assert main(["--arch", "resnest50", "--input", str(path), "--output", str(output)]) == 0

    model_config = models.classifier_config(arch="resnest50", num_classes=20, bn_mode="global")
    model = models.create_model(model_config, rngs=nnx.Rngs(1))
    checkpointing.initialise_from_export(model, str(output), ("model",), field="train_cam.init_from")
    conv = official.conv1[0].weight.detach().numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
    np.testing.assert_array_equal(np.asarray(model.model.conv1[0].kernel[...]), conv)

    model.train()
    mesh = sharding.create_mesh(1)
    _, params, _ = training.split_model(model)
    optimizer = optim.create_optimizer(params, learning_rate=0.01, weight_decay=1e-4, total_steps=10)
    cam = ml_collections.ConfigDict(dict(loss_option="cl_pcl_re", grid=2, level="feature", re_loss="l1",
                                         re_loss_option="masking", alpha=4.0, alpha_schedule=0.5))
    objective = objectives.create_puzzle_objective(cam, 10, 16)
    graphdef, state = training.create_train_state(model, optimizer, mesh)
    step = training.make_train_step(graphdef, optimizer, objective, mesh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(2, 64, 64, 3)).astype(np.float32),
             "labels": np.eye(20, dtype=np.float32)[[3, 7]]}
    before = np.asarray(state.params["model"]["conv1"][0]["kernel"])
    state, metrics = step(state, sharding.host_batch_to_global(batch, mesh))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
    after = np.asarray(state.params["model"]["conv1"][0]["kernel"])
    assert not np.allclose(before, after)
