"""Tests for puzzle_jax.models.affinity (AffinityNet): shapes and strides, the frozen backbone, the model config, and
parity with the torch transcription of the authors' AffinityNet (benchmarks/authors_torch.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch_reference import nnx_tree_from_torch_layout, randomize_batch_norm, relative_error, torch_variables

from benchmarks import authors_torch
from puzzle_jax import models
from puzzle_jax.models import affinity


@pytest.fixture(scope="module")
def tiny():
    return models.create_affinity_net("resnet_tiny", rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "size, expected",
    # Multiples of 16, and sides that are not (stage3..5 are then rounded up and cropped back to stage2's size).
    [((64, 80), (16, 20)), ((100, 68), (25, 17)), ((102, 97), (26, 25))],
)
def test_edge_logits_are_one_map_at_stride_four(tiny, size, expected):
    images = jnp.asarray(np.random.RandomState(0).randn(2, *size, 3), jnp.float32)
    logits = tiny(images)
    assert logits.shape == (2, *expected) and logits.dtype == jnp.float32
    assert expected == tuple(-(-side // 4) for side in size)


def test_backbone_strides_at_output_stride_16(tiny):
    stages = tiny.model(jnp.zeros((1, 64, 64, 3)))
    sides = {name: stage.shape[1] for name, stage in stages.items()}
    assert sides == {"stage1": 16, "stage2": 16, "stage3": 8, "stage4": 4, "stage5": 4}
    assert tiny.model.output_stride == 16


def test_bfloat16_model_returns_float32_logits():
    model = models.create_affinity_net("resnet_tiny", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    logits = model(jnp.zeros((1, 32, 32, 3)))
    assert logits.dtype == jnp.float32 and logits.shape == (1, 8, 8)
    # Parameters and statistics stay float32.
    variables = jax.tree.leaves(nnx.state(model, nnx.Param, nnx.BatchStat))
    assert {leaf.dtype for leaf in variables} == {np.dtype(np.float32)}


def test_no_gradient_reaches_the_backbone_and_batch_statistics_stay(tiny):
    images = jnp.asarray(np.random.RandomState(1).randn(2, 32, 32, 3), jnp.float32)
    tiny.train()
    stats_before = jax.tree.map(np.asarray, nnx.state(tiny, nnx.BatchStat))

    def loss(model):
        return jnp.sum(jax.nn.sigmoid(model(images)) ** 2)

    grads = nnx.grad(loss)(tiny)
    backbone = jax.tree.leaves(grads["model"])
    edges = [leaf for name in grads if name != "model" for leaf in jax.tree.leaves(grads[name])]
    assert backbone and all(not np.any(np.asarray(leaf)) for leaf in backbone)
    assert len(edges) == 5 * 3 + 2 and all(np.any(np.asarray(leaf)) for leaf in edges)
    # Frozen BatchNorm: training behaviour does not touch the running statistics.
    stats_after = jax.tree.map(np.asarray, nnx.state(tiny, nnx.BatchStat))
    for before, after in zip(jax.tree.leaves(stats_before), jax.tree.leaves(stats_after), strict=True):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize(
    "arch, features",
    [("resnet50", 64), ("resnet101", 64), ("resnest50", 64), ("resnest101", 128), ("resnet_tiny", 16)],
)
def test_first_branch_takes_the_backbones_stage1_channels(arch, features):
    model = nnx.eval_shape(lambda: models.create_affinity_net(arch, rngs=nnx.Rngs(0)))
    assert model.fc_edge1[0].kernel.shape == (1, 1, features, 32)
    assert [branch[0].kernel.shape[2] for branch in model.branches()][1:] == list(model.model.stage_features[1:])
    assert model.fc_edge6.kernel.shape == (1, 1, 160, 1) and model.fc_edge6.bias.shape == (1,)
    if arch == "resnet101":
        # The authors' name rule gets ResNet-101 wrong; ours reads the backbone.
        assert authors_torch.authors_edge1_features(arch) == 128
    elif arch != "resnet_tiny":
        assert authors_torch.authors_edge1_features(arch) == features


def test_model_config_round_trip_and_errors():
    config = models.affinity_config(arch="resnet_tiny", dtype="bfloat16")
    assert config == {"family": "affinity", "arch": "resnet_tiny", "dtype": "bfloat16", "remat": False}
    assert "affinity" in models.MODEL_FAMILIES and models.model_family(config) == "affinity"
    model = nnx.eval_shape(lambda: models.create_model(config, rngs=nnx.Rngs(0)))
    assert isinstance(model, models.AffinityNet) and model.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="model.dtype"):
        models.affinity_config(arch="resnet_tiny", dtype="float16")
    with pytest.raises(ValueError, match="model.arch"):
        models.affinity_config(arch="vgg16")


def test_branches_start_as_torch_initialises_them(tiny):
    kernel = np.asarray(tiny.fc_edge5[0].kernel[...])
    bound = 1 / np.sqrt(kernel.shape[2])
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    np.testing.assert_array_equal(np.asarray(tiny.fc_edge3[1].scale[...]), np.ones(32))
    np.testing.assert_array_equal(np.asarray(tiny.fc_edge3[1].bias[...]), np.zeros(32))


def _torch_affinity_net(seed: int = 0) -> authors_torch.AffinityNet:
    """The authors' AffinityNet on our resnet_tiny (base width 16), BatchNorm and GroupNorm randomised."""
    torch.manual_seed(seed)
    backbone = authors_torch.resnet(authors_torch.RESNET_BLOCKS["resnet_tiny"], 16, base_width=16)
    randomize_batch_norm(backbone, seed)
    # resnet_tiny's stem has 16 channels; the authors' name rule knows only their full-width networks.
    model = authors_torch.AffinityNet(backbone, edge1_features=16)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.edge_layers.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(torch.rand(32, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(32, generator=generator) - 0.5)
    return model.train()


def _converted(reference, dtype):
    model = nnx.eval_shape(
        lambda: models.AffinityNet(
            models.create_backbone("resnet_tiny", bn_mode="frozen", dtype=dtype, rngs=nnx.Rngs(0)),
            dtype=dtype,
            rngs=nnx.Rngs(0),
        )
    )
    variables = torch_variables(reference)
    for kind in (nnx.Param, nnx.BatchStat):
        state = nnx.state(model, kind)
        nnx.update(model, jax.tree.map(jnp.asarray, nnx_tree_from_torch_layout(nnx.to_pure_dict(state), variables)))
    return model


@pytest.mark.parametrize("size", [(64, 64), (68, 84)])
def test_edge_logits_match_the_authors_affinity_net(size):
    reference = _torch_affinity_net()
    images = np.random.RandomState(2).randn(2, *size, 3).astype(np.float32)
    nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        expected32 = reference(nchw)[:, 0].numpy()
        expected64 = reference.double()(nchw.double())[:, 0].numpy()
    model = _converted(reference.float(), jnp.float32)
    model.train()
    assert relative_error(model(jnp.asarray(images)), expected32) < 1e-5
    with jax.enable_x64(True):
        model64 = _converted(reference.float(), jnp.float64)
        model64.train()
        logits = model64(jnp.asarray(images, jnp.float64))
        assert logits.dtype == jnp.float64
        assert relative_error(logits, expected64) < 1e-10


def test_upsampling_is_torchs_bilinear_without_aligned_corners():
    x = np.random.RandomState(3).randn(1, 3, 5, 2)
    for factor in (2, 4):
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), scale_factor=factor, mode="bilinear", align_corners=False
        )
        with jax.enable_x64(True):
            ours = affinity.upsample_bilinear(jnp.asarray(x), factor)
            assert relative_error(ours, expected.numpy().transpose(0, 2, 3, 1)) < 1e-12
