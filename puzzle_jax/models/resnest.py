"""ResNeSt-50/101/200/269 (Zhang et al. 2020) as the official ``resnest`` package builds them.

Settings shared by the four networks (the official ``resnest{50,101,200,269}`` constructors): radix 2,
cardinality 1, bottleneck width 64, a deep stem (three 3x3 convs, stem width 32 for ResNeSt-50 and 64 for the
others), ``avg_down`` shortcuts (AvgPool of size = stride with ``ceil_mode=True, count_include_pad=False``,
then a 1x1 conv and BN) and ``avd`` (a 3x3 AvgPool with padding 1 after the split-attention conv, which then
has stride 1; present in the first block of layer2..4 and absent in layer1).

Attribute names mirror the official state-dict keys: ``conv1`` is an ``nnx.List`` with the torch
``nn.Sequential`` indices (0 conv, 1 bn, 2 relu, 3 conv, 4 bn, 5 relu, 6 conv), blocks have
``conv1/bn1/conv2/conv3/bn3/downsample/avd_layer`` and the split-attention conv ``conv2`` has
``conv/bn0/fc1/bn1/fc2``; ``downsample`` is (0 AvgPool, 1 conv, 2 bn).

Output stride, as ``resnest.torch.resnet.ResNet(dilated=..., dilation=...)`` builds it:
  * 16 (the authors' setting, ``dilation=2, dilated=False``): layer3 stride 2; layer4 stride 1 with dilation 2
    except its first block (dilation 1). Layer4's first block keeps a stride-1 ``avd`` AvgPool (3x3, padding 1,
    padding counted in the mean) and its shortcut pool is a 1x1 AvgPool (identity).
  * 8 (``dilated=True``, the authors' ``segmentation=True``): layer3 stride 1 with dilation 2 (first block 1),
    layer4 stride 1 with dilation 4 (first block 2); both first blocks keep a stride-1 ``avd`` pool.
  * 32 (``dilation=1, dilated=False``): the ImageNet network, strides 2 in layer2..4.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from puzzle_jax.models import layers
from puzzle_jax.models.resnet import EXPANSION, build_layers, check_output_stride, run_layers

# (stride, dilation of the first block, dilation of the other blocks) for layer2, layer3, layer4.
_RESNEST_LAYER_GEOMETRY = {
    32: ((2, 1, 1), (2, 1, 1), (2, 1, 1)),
    16: ((2, 1, 1), (2, 1, 1), (1, 1, 2)),
    8: ((2, 1, 1), (1, 1, 2), (1, 2, 4)),
}

RADIX = 2
REDUCTION_FACTOR = 4
# How the split-attention block computes its grouped (groups = radix) 3x3 convolution; the same function and
# parameters in each case, only the program differs (which one is fastest is a property of the accelerator's
# convolution library, see BENCHMARKS.md):
#   * ``grouped``: one convolution with ``feature_group_count=radix`` (cuDNN slices the channels of each group).
#   * ``split``: one plain convolution per radix split, on that split's input channels; the splits stay separate
#     arrays through BatchNorm, ReLU and the attention-weighted sum, so nothing is sliced or concatenated but the
#     block's input (a slice XLA can fuse into the producing BatchNorm/ReLU).
#   * ``block_diagonal``: one plain convolution with a block-diagonal kernel (radix x the arithmetic).
GROUPED_CONV_IMPLEMENTATIONS = ("grouped", "split", "block_diagonal")


class SplitAttentionConv(nnx.Module):
    """Split-attention 3x3 conv (``SplAtConv2d`` with radix 2, cardinality 1, BN).

    A grouped conv (groups = radix) outputs radix x channels; BN, ReLU; the radix splits are summed,
    globally average-pooled, passed through fc1 (1x1 with bias) -> BN -> ReLU -> fc2 (1x1 with bias), and a
    softmax over the radix axis weighs the splits in the output sum. ``grouped_conv`` chooses the program of the
    grouped conv (``GROUPED_CONV_IMPLEMENTATIONS``).
    """

    def __init__(
        self,
        in_features: int,
        channels: int,
        *,
        stride: int,
        dilation: int,
        radix: int = RADIX,
        bn_kwargs: dict,
        grouped_conv: str = "grouped",
        dtype=jnp.float32,
        rngs: nnx.Rngs | layers.KernelInitializer,
    ):
        if grouped_conv not in GROUPED_CONV_IMPLEMENTATIONS:
            raise ValueError(f"grouped_conv must be one of {GROUPED_CONV_IMPLEMENTATIONS}, got {grouped_conv!r}")
        self.radix = radix
        self.channels = channels
        self.grouped_conv = grouped_conv
        inter_features = max(in_features * radix // REDUCTION_FACTOR, 32)
        self.conv = layers.Conv2d(
            in_features,
            channels * radix,
            3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            groups=radix,
            dtype=dtype,
            rngs=rngs,
        )
        self.bn0 = layers.BatchNorm(channels * radix, **bn_kwargs)
        self.fc1 = layers.Conv2d(channels, inter_features, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.bn1 = layers.BatchNorm(inter_features, **bn_kwargs)
        self.fc2 = layers.Conv2d(
            inter_features, channels * radix, 1, use_bias=True, dtype=dtype, rngs=rngs
        )

    def _attention(self, summed: jax.Array) -> jax.Array:
        """Softmax weights (B, 1, 1, radix, C) of the splits, from their sum (B, H, W, C)."""
        gap = jnp.mean(summed, axis=(1, 2), keepdims=True)
        attention = self.fc2(jax.nn.relu(self.bn1(self.fc1(gap))))
        return jax.nn.softmax(attention.reshape(summed.shape[0], 1, 1, self.radix, self.channels), axis=3)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.grouped_conv == "split":
            group_in = x.shape[-1] // self.radix
            inputs = [x[..., r * group_in : (r + 1) * group_in] for r in range(self.radix)]
            splits = [jax.nn.relu(split) for split in self.bn0.call_channel_parts(self.conv.call_groups(inputs))]
            attention = self._attention(sum(splits[1:], splits[0]))
            return sum(attention[..., r, :] * split for r, split in enumerate(splits))
        x = self.conv(x) if self.grouped_conv == "grouped" else self.conv.call_block_diagonal(x)
        x = jax.nn.relu(self.bn0(x))
        batch, height, width, _ = x.shape
        # torch.split along channels: split r holds channels [r*C, (r+1)*C).
        splits = x.reshape(batch, height, width, self.radix, self.channels)
        attention = self._attention(jnp.sum(splits, axis=3))
        return jnp.sum(attention * splits, axis=3)


class ResNeStBottleneck(nnx.Module):
    """ResNeSt Bottleneck: 1x1 -> split-attention 3x3 -> [avd AvgPool] -> 1x1 (x4), residual + ReLU."""

    def __init__(
        self,
        in_features: int,
        planes: int,
        *,
        stride: int,
        dilation: int,
        is_first: bool,
        downsample: bool,
        bn_kwargs: dict,
        grouped_conv: str = "grouped",
        dtype=jnp.float32,
        rngs: nnx.Rngs | layers.KernelInitializer,
    ):
        out_features = planes * EXPANSION
        self.conv1 = layers.Conv2d(in_features, planes, 1, dtype=dtype, rngs=rngs)
        self.bn1 = layers.BatchNorm(planes, **bn_kwargs)
        use_avd = stride > 1 or is_first
        # avd moves the stride from the conv to a 3x3 AvgPool (padding 1, padding counted in the mean).
        self.avd_layer = layers.AvgPool2d(3, stride, padding=1) if use_avd else None
        self.conv2 = SplitAttentionConv(
            planes,
            planes,
            stride=1 if use_avd else stride,
            dilation=dilation,
            bn_kwargs=bn_kwargs,
            grouped_conv=grouped_conv,
            dtype=dtype,
            rngs=rngs,
        )
        self.conv3 = layers.Conv2d(planes, out_features, 1, dtype=dtype, rngs=rngs)
        self.bn3 = layers.BatchNorm(out_features, **bn_kwargs)
        if downsample:
            self.downsample = nnx.List(
                [
                    # avg_down: the shortcut pools first (size = stride; 1x1, the identity, when stride is 1).
                    layers.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                    layers.Conv2d(in_features, out_features, 1, dtype=dtype, rngs=rngs),
                    layers.BatchNorm(out_features, **bn_kwargs),
                ]
            )
        else:
            self.downsample = None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        if self.avd_layer is not None:
            out = self.avd_layer(out)
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else layers.apply_sequential(self.downsample, x)
        return jax.nn.relu(out + residual)


class ResNeSt(nnx.Module):
    """A ResNeSt backbone returning the five stage outputs (stage1 = deep stem, bn1, ReLU, max-pool)."""

    def __init__(
        self,
        blocks_per_layer: Sequence[int],
        *,
        stem_width: int,
        output_stride: int = 16,
        bn_mode: str = "frozen",
        bn_group_size: int | None = None,
        bn_statistics: str = "two_pass",
        grouped_conv: str = "grouped",
        dtype=jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        """Creates the network.

        Args:
          blocks_per_layer: blocks in layer1..4 (ResNeSt-50: [3, 4, 6, 3]).
          stem_width: channels of the first two stem convs; stage1 has 2x as many.
          output_stride, bn_mode, bn_group_size, bn_statistics, dtype, remat, rngs: as in ``resnet.ResNet``.
          grouped_conv: the program of the split-attention convolutions, one of ``GROUPED_CONV_IMPLEMENTATIONS``.
        """
        check_output_stride(output_stride)
        # One key from rngs, all kernels drawn at once at the end (see layers.KernelInitializer).
        kernels = layers.KernelInitializer(rngs)
        bn_kwargs = dict(mode=bn_mode, group_size=bn_group_size, statistics=bn_statistics, dtype=dtype)
        self.remat = remat
        self.output_stride = output_stride
        self.conv1 = nnx.List(
            [
                layers.Conv2d(3, stem_width, 3, stride=2, padding=1, dtype=dtype, rngs=kernels),
                layers.BatchNorm(stem_width, **bn_kwargs),
                layers.ReLU(),
                layers.Conv2d(stem_width, stem_width, 3, padding=1, dtype=dtype, rngs=kernels),
                layers.BatchNorm(stem_width, **bn_kwargs),
                layers.ReLU(),
                layers.Conv2d(stem_width, stem_width * 2, 3, padding=1, dtype=dtype, rngs=kernels),
            ]
        )
        self.bn1 = layers.BatchNorm(stem_width * 2, **bn_kwargs)
        self.maxpool = layers.MaxPool2d(3, 2, 1)

        def make_block(in_features, planes, *, stride, dilation, downsample, layer_index, first):
            return ResNeStBottleneck(
                in_features,
                planes,
                stride=stride,
                dilation=dilation,
                # The official code passes is_first=False for layer1 only.
                is_first=first and layer_index > 0,
                downsample=downsample,
                bn_kwargs=bn_kwargs,
                grouped_conv=grouped_conv,
                dtype=dtype,
                rngs=kernels,
            )

        stages, in_features = build_layers(
            make_block, blocks_per_layer, _RESNEST_LAYER_GEOMETRY[output_stride], stem_width * 2, 64
        )
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        kernels.finalize()
        self.out_features = in_features
        self.stage_features = (stem_width * 2,) + tuple(64 * 2**i * EXPANSION for i in range(4))

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = x.astype(self.conv1[0].dtype)
        outputs = {}
        x = self.maxpool(jax.nn.relu(self.bn1(layers.apply_sequential(self.conv1, x))))
        outputs["stage1"] = x
        return run_layers(self, x, outputs)


RESNEST_BLOCKS = {
    "resnest50": (3, 4, 6, 3),
    "resnest101": (3, 4, 23, 3),
    "resnest200": (3, 24, 36, 3),
    "resnest269": (3, 30, 48, 8),
}
RESNEST_STEM_WIDTH = {"resnest50": 32, "resnest101": 64, "resnest200": 64, "resnest269": 64}


def create_resnest(arch: str, **kwargs) -> ResNeSt:
    """Creates ``resnest50/101/200/269``; ``kwargs`` go to ``ResNeSt``."""
    if arch not in RESNEST_BLOCKS:
        raise ValueError(f"arch must be one of {tuple(RESNEST_BLOCKS)}, got {arch!r}")
    return ResNeSt(RESNEST_BLOCKS[arch], stem_width=RESNEST_STEM_WIDTH[arch], **kwargs)
