"""Tests for puzzle_jax.models.deeplab (DeepLabv3+): parity with a PyTorch transcription of the authors' ASPP and
decoder (written here from spec §9) on the authors' ResNet transcription, sizes, dropout, initialisation, optimizer
groups and the model config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as functional
from flax import nnx
from torch import nn
from torch_reference import nnx_tree_from_torch_layout, randomize_batch_norm, relative_error, torch_variables

from benchmarks import authors_torch
from puzzle_jax import models, optim
from puzzle_jax.models import deeplab, layers

# --------------------------------------------------------------------------------------------------
# The authors' head in PyTorch (core/deeplab_utils.py and DeepLabv3_Plus, as spec §9 describes them)
# --------------------------------------------------------------------------------------------------


class FixedBatchNorm(nn.BatchNorm2d):
    """Their ``fix`` mode: always the running statistics."""

    def forward(self, x):
        return functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
        )


def group_norm(features):
    return nn.GroupNorm(4, features)


def _initialize(modules):
    for module in modules:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.data.fill_(1)
            module.bias.data.zero_()


class TorchASPPModule(nn.Module):
    def __init__(self, inplanes, planes, kernel_size, padding, dilation, norm_fn):
        super().__init__()
        self.atrous_conv = nn.Conv2d(inplanes, planes, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.bn = norm_fn(planes)
        self.relu = nn.ReLU()
        _initialize([self.atrous_conv, self.bn])

    def forward(self, x):
        return self.relu(self.bn(self.atrous_conv(x)))


class TorchASPP(nn.Module):
    def __init__(self, inplanes, norm_fn):
        super().__init__()
        dilations = [1, 6, 12, 18]
        self.aspp1 = TorchASPPModule(inplanes, 256, 1, 0, dilations[0], norm_fn)
        self.aspp2 = TorchASPPModule(inplanes, 256, 3, dilations[1], dilations[1], norm_fn)
        self.aspp3 = TorchASPPModule(inplanes, 256, 3, dilations[2], dilations[2], norm_fn)
        self.aspp4 = TorchASPPModule(inplanes, 256, 3, dilations[3], dilations[3], norm_fn)
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)), nn.Conv2d(inplanes, 256, 1, bias=False), norm_fn(256), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(1280, 256, 1, bias=False)
        self.bn1 = norm_fn(256)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        _initialize([self.conv1, self.bn1, *self.global_avg_pool.modules()])

    def forward(self, x):
        x1, x2, x3, x4 = self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x)
        x5 = functional.interpolate(self.global_avg_pool(x), size=x4.shape[2:], mode="bilinear", align_corners=True)
        x = torch.cat((x1, x2, x3, x4, x5), dim=1)
        return self.dropout(self.relu(self.bn1(self.conv1(x))))


class TorchDecoder(nn.Module):
    def __init__(self, num_classes, low_level_inplanes, norm_fn):
        super().__init__()
        self.conv1 = nn.Conv2d(low_level_inplanes, 48, 1, bias=False)
        self.bn1 = norm_fn(48)
        self.relu = nn.ReLU()
        self.classifier = nn.Sequential(
            nn.Conv2d(304, 256, 3, padding=1, bias=False),
            norm_fn(256),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            norm_fn(256),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(256, num_classes, 1),
        )
        _initialize([self.conv1, self.bn1, *self.classifier.modules()])

    def forward(self, x, x_low_level):
        x_low_level = self.relu(self.bn1(self.conv1(x_low_level)))
        x = functional.interpolate(x, size=x_low_level.shape[2:], mode="bilinear", align_corners=True)
        return self.classifier(torch.cat((x, x_low_level), dim=1))


class TorchDeepLab(nn.Module):
    """``DeepLabv3_Plus``: backbone ``model`` (stage1 = stem + max-pool, stage2..5 = layer1..4), low level = stage2."""

    def __init__(self, backbone, num_classes, use_gn):
        super().__init__()
        self.model = backbone
        del self.model.avgpool
        del self.model.fc
        norm_fn = group_norm if use_gn else FixedBatchNorm
        self.aspp = TorchASPP(backbone.layer4[-1].conv3.out_channels, norm_fn)
        self.decoder = TorchDecoder(num_classes, backbone.layer1[-1].conv3.out_channels, norm_fn)

    def forward(self, images):
        b = self.model
        low_level = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(images)))))
        x = self.aspp(b.layer4(b.layer3(b.layer2(low_level))))
        x = self.decoder(x, low_level)
        return functional.interpolate(x, size=images.shape[2:], mode="bilinear", align_corners=True)


def _torch_deeplab(use_gn: bool, num_classes: int = 5, seed: int = 0) -> TorchDeepLab:
    """The authors' DeepLabv3+ on our resnet_tiny (the authors' ResNet at base width 16), every BatchNorm (backbone,
    and the head's without GN) and GroupNorm randomised so that conversion mistakes show; eval mode (no dropout)."""
    torch.manual_seed(seed)
    backbone = authors_torch.resnet(authors_torch.RESNET_BLOCKS["resnet_tiny"], 16, base_width=16)
    model = TorchDeepLab(backbone, num_classes, use_gn)
    randomize_batch_norm(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.copy_(torch.rand(module.num_channels, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.num_channels, generator=generator) - 0.5)
    return model.eval()


def _converted(reference, use_gn, num_classes, dtype):
    model = nnx.eval_shape(
        lambda: models.DeepLabV3Plus(
            models.create_backbone("resnet_tiny", bn_mode="frozen", dtype=dtype, rngs=nnx.Rngs(0)),
            num_classes,
            use_gn=use_gn,
            dtype=dtype,
            rngs=nnx.Rngs(0),
        )
    )
    variables = torch_variables(reference)
    for kind in (nnx.Param, nnx.BatchStat):
        state = nnx.to_pure_dict(nnx.state(model, kind))
        nnx.update(model, jax.tree.map(jnp.asarray, nnx_tree_from_torch_layout(state, variables)))
    return model


@pytest.mark.parametrize("use_gn", [True, False], ids=["group_norm", "frozen_batch_norm"])
def test_logits_match_the_authors_deeplab(use_gn):
    reference = _torch_deeplab(use_gn)
    # 68 x 84: stage2 17 x 21, stage5 5 x 6 (a side that is not a multiple of 16 on each axis).
    images = np.random.RandomState(2).randn(2, 68, 84, 3).astype(np.float32)
    nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        expected32 = reference(nchw).permute(0, 2, 3, 1).numpy()
        expected64 = reference.double()(nchw.double()).permute(0, 2, 3, 1).numpy()
    # Every torch parameter and statistic has an NNX home and vice versa.
    model = _converted(reference.float(), use_gn, 5, jnp.float32)
    ours = [nnx.to_pure_dict(state) for state in nnx.state(model, nnx.Param, nnx.BatchStat)]
    assert len(jax.tree.leaves(ours)) == len(torch_variables(reference))
    logits = model(jnp.asarray(images))
    assert logits.shape == (2, 68, 84, 5) and logits.dtype == jnp.float32
    assert relative_error(logits, expected32) < 1e-4
    with jax.enable_x64(True):
        model64 = _converted(reference.float(), use_gn, 5, jnp.float64)
        logits64 = model64(jnp.asarray(images, jnp.float64))
        assert logits64.dtype == jnp.float64
        assert relative_error(logits64, expected64) < 1e-12


@pytest.mark.parametrize("arch", ["resnet50", "resnest50"])
def test_full_size_backbones_feed_the_authors_widths(arch):
    model = nnx.eval_shape(lambda: models.create_deeplab(arch, 21, rngs=nnx.Rngs(0)))
    # The authors hard-code 2048 ASPP input channels and 256 low-level (layer1) channels.
    assert model.aspp.aspp2.atrous_conv.kernel.shape == (3, 3, 2048, 256)
    assert model.aspp.global_avg_pool[1].kernel.shape == (1, 1, 2048, 256)
    assert model.decoder.conv1.kernel.shape == (1, 1, 256, 48)
    assert model.decoder.classifier[0].kernel.shape == (3, 3, 304, 256)
    assert model.aspp.aspp4.atrous_conv.dilation == (18, 18) and model.aspp.aspp4.atrous_conv.padding == (18, 18)


@pytest.fixture(scope="module")
def tiny():
    return models.create_deeplab("resnet_tiny", 21, rngs=nnx.Rngs(0))


def test_logits_are_at_the_input_size_for_any_side(tiny):
    images = jnp.asarray(np.random.RandomState(0).randn(1, 97, 130, 3), jnp.float32)
    logits = tiny(images)
    assert logits.shape == (1, 97, 130, 21) and logits.dtype == jnp.float32
    stages = tiny.model(images)
    # The decoder works at stage2's ceil(n / 4); the ASPP at stage5's ceil(n / 16).
    assert stages["stage2"].shape[1:3] == (25, 33) and stages["stage5"].shape[1:3] == (7, 9)


def test_dropout_only_with_a_key(tiny):
    images = jnp.asarray(np.random.RandomState(1).randn(1, 32, 48, 3), jnp.float32)
    first, second = tiny(images), tiny(images)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    key = jax.random.key(0)
    dropped = tiny(images, dropout_key=key)
    assert not np.allclose(np.asarray(dropped), np.asarray(first))
    np.testing.assert_array_equal(np.asarray(tiny(images, dropout_key=key)), np.asarray(dropped))
    assert not np.allclose(np.asarray(tiny(images, dropout_key=jax.random.key(1))), np.asarray(dropped))


def test_dropout_is_torchs_inverted_dropout():
    x = jnp.asarray(np.random.RandomState(2).rand(4, 50, 50, 8) + 0.5, jnp.float32)
    for rate in (0.5, 0.1):
        y = np.asarray(deeplab.dropout(x, rate, jax.random.key(3)))
        kept = y != 0
        # Survivors scaled by 1 / (1 - rate), the others zeroed, about `rate` of them.
        np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
        assert abs((~kept).mean() - rate) < 0.01
    np.testing.assert_array_equal(np.asarray(deeplab.dropout(x, 0.5, None)), np.asarray(x))


def test_head_starts_as_the_authors_initialise_it(tiny):
    kernel = np.asarray(tiny.decoder.classifier[0].kernel[...])
    # torch's kaiming_normal_ defaults: fan_in = 3 * 3 * 304, gain sqrt(2).
    assert abs(kernel.std() / np.sqrt(2 / (9 * 304)) - 1) < 0.02 and abs(kernel.mean()) < 1e-3
    conv1 = np.asarray(tiny.aspp.conv1.kernel[...])
    assert abs(conv1.std() / np.sqrt(2 / 1280) - 1) < 0.02
    bias = np.asarray(tiny.decoder.classifier[8].bias[...])
    assert np.all(np.abs(bias) <= 1 / 16) and np.any(bias != 0)
    norm = tiny.aspp.aspp3.bn
    assert isinstance(norm, nnx.GroupNorm) and norm.num_groups == 4
    np.testing.assert_array_equal(np.asarray(norm.scale[...]), np.ones(256))
    np.testing.assert_array_equal(np.asarray(norm.bias[...]), np.zeros(256))


def test_backbone_is_the_pretrained_group_and_the_head_the_scratch_groups(tiny):
    groups = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(tiny, nnx.Param)))[0]:
        top = str(getattr(path[0], "key", path[0]))
        groups.setdefault(top, []).append(optim.parameter_group(path))
    assert set(groups) == {"model", "aspp", "decoder"}
    assert set(groups["model"]) == {"pretrained_weight", "pretrained_bias"}
    head = groups["aspp"] + groups["decoder"]
    # 10 convolution kernels and 9 GroupNorm scales; 9 GroupNorm biases and the classifier's bias.
    assert head.count("scratch_weight") == 19 and head.count("scratch_bias") == 10 and len(head) == 29
    assert tiny.model.output_stride == 16 and tiny.model.bn1.mode == "frozen"


def test_frozen_batch_norm_head_keeps_its_statistics():
    model = models.create_deeplab("resnet_tiny", 3, use_gn=False, rngs=nnx.Rngs(0))
    assert isinstance(model.decoder.bn1, layers.BatchNorm) and model.decoder.bn1.mode == "frozen"
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    images = jnp.asarray(np.random.RandomState(4).randn(2, 32, 32, 3), jnp.float32)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(images, dropout_key=jax.random.key(0)) ** 2)))(model)
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(old, new)
    # Unlike AffinityNet's, the backbone is trained: gradients reach it.
    assert any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(grads["model"]))


def test_model_config_round_trip_and_errors():
    config = models.segmentation_config(arch="resnet_tiny", num_classes=21, use_gn=False, dtype="bfloat16")
    assert config == {
        "family": "segmentation",
        "arch": "resnet_tiny",
        "num_classes": 21,
        "use_gn": False,
        "head_features": 256,
        "low_level_features": 48,
        "dtype": "bfloat16",
        "remat": False,
    }
    assert "segmentation" in models.MODEL_FAMILIES and models.model_family(config) == "segmentation"
    model = nnx.eval_shape(lambda: models.create_model(config, rngs=nnx.Rngs(0)))
    assert isinstance(model, models.DeepLabV3Plus) and model.dtype == jnp.bfloat16 and not model.use_gn
    assert model.num_classes == 21 and model.decoder.classifier[8].kernel.shape == (1, 1, 256, 21)
    remat = models.segmentation_config(arch="resnet_tiny", num_classes=21, remat=True)
    assert nnx.eval_shape(lambda: models.create_model(remat, rngs=nnx.Rngs(0))).model.remat
    # A narrow head (the demo's): every width follows, and a config written before the widths were recorded builds
    # the authors' head.
    narrow = models.segmentation_config(arch="resnet_tiny", num_classes=3, head_features=32, low_level_features=12)
    head = nnx.eval_shape(lambda: models.create_model(narrow, rngs=nnx.Rngs(0)))
    assert head.aspp.conv1.kernel.shape == (1, 1, 5 * 32, 32) and head.decoder.conv1.kernel.shape[-1] == 12
    assert head.decoder.classifier[0].kernel.shape == (3, 3, 32 + 12, 32)
    legacy = {key: value for key, value in narrow.items() if not key.endswith("features")}
    assert nnx.eval_shape(lambda: models.create_model(legacy, rngs=nnx.Rngs(0))).aspp.conv1.kernel.shape[-1] == 256
    for field, kwargs in [
        ("model.arch", dict(arch="vgg16")),
        ("model.num_classes", dict(num_classes=0)),
        ("model.use_gn", dict(use_gn="yes")),
        ("model.dtype", dict(dtype="float16")),
        ("model.remat", dict(remat=1)),
        ("seg.head_features", dict(head_features=30)),
        ("seg.low_level_features", dict(low_level_features=0)),
    ]:
        with pytest.raises(ValueError, match=field):
            models.segmentation_config(**{"arch": "resnet_tiny", "num_classes": 21, **kwargs})


def test_bfloat16_model_returns_float32_logits():
    model = models.create_deeplab("resnet_tiny", 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    images = jnp.asarray(np.random.RandomState(5).randn(1, 40, 36, 3), jnp.float32)
    logits = nnx.jit(lambda m, x, key: m(x, dropout_key=key))(model, images, jax.random.key(0))
    assert logits.dtype == jnp.float32 and logits.shape == (1, 40, 36, 4)
    assert np.all(np.isfinite(np.asarray(logits)))
    variables = jax.tree.leaves(nnx.state(model, nnx.Param, nnx.BatchStat))
    assert {leaf.dtype for leaf in variables} == {np.dtype(np.float32)}
