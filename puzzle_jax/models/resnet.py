"""ResNet-50/101 (torchvision layout, Bottleneck with the stride on the 3x3 conv) and two narrow CPU variants.

Attribute names mirror the torchvision/authors' state-dict keys, so that ``layer3.4.conv2.weight`` is the NNX
path ``layer3/4/conv2/kernel`` and weight conversion is an identity map on names (see ``puzzle_jax.weights``).

Output stride (the ratio of input size to stage5 size):
  * 16 (default, the authors' backbone): strides (2, 2, 2, 1), i.e. layer4 has stride 1 and **no dilation**.
    This is what ``core/arch_resnet`` builds for every Puzzle-CAM, AffinityNet and DeepLab model.
  * 32: torchvision's ImageNet network, strides (2, 2, 2, 2), no dilation.
  * 8: torchvision's ``replace_stride_with_dilation=[False, True, True]`` (the DeepLab convention): layer3 and
    layer4 have stride 1; layer3's blocks use dilation 2 except its first (1), layer4's use 4 except its first (2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from puzzle_jax.models import layers

EXPANSION = 4

# (stride, dilation of the first block, dilation of the other blocks) for layer2, layer3, layer4.
_RESNET_LAYER_GEOMETRY = {
    32: ((2, 1, 1), (2, 1, 1), (2, 1, 1)),
    16: ((2, 1, 1), (2, 1, 1), (1, 1, 1)),
    8: ((2, 1, 1), (1, 1, 2), (1, 2, 4)),
}
OUTPUT_STRIDES = tuple(sorted(_RESNET_LAYER_GEOMETRY))


def check_output_stride(output_stride: int) -> None:
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")


def build_layers(
    make_block: Callable[..., nnx.Module],
    blocks_per_layer: Sequence[int],
    layer_geometry: Sequence[tuple[int, int, int]],
    in_features: int,
    base_planes: int,
) -> tuple[list[nnx.List], int]:
    """layer1..4 of a Bottleneck network: ``blocks_per_layer[k]`` blocks of ``base_planes * 2**k`` planes.

    Args:
      make_block: ``make_block(in_features, planes, *, stride, dilation, downsample, layer_index, first)`` creates
        one block (``first``: the layer's first block, which carries the stride).
      blocks_per_layer: blocks in layer1..4.
      layer_geometry: (stride, dilation of the first block, dilation of the others) of layer2..4; layer1 has
        stride 1 and no dilation.
      in_features: channels of the stem's output.
      base_planes: planes of layer1.

    Returns:
      The four layers (``nnx.List`` of blocks) and the channels of the last one's output.
    """
    geometry = ((1, 1, 1),) + tuple(layer_geometry)
    stages = []
    for index, (num_blocks, (stride, first_dilation, dilation)) in enumerate(
        zip(blocks_per_layer, geometry, strict=True)
    ):
        planes = base_planes * 2**index
        blocks = []
        for block_index in range(num_blocks):
            first = block_index == 0
            blocks.append(
                make_block(
                    in_features,
                    planes,
                    stride=stride if first else 1,
                    dilation=first_dilation if first else dilation,
                    # The projection shortcut, where the stride or the width changes.
                    downsample=first and (stride != 1 or in_features != planes * EXPANSION),
                    layer_index=index,
                    first=first,
                )
            )
            in_features = planes * EXPANSION
        stages.append(nnx.List(blocks))
    return stages, in_features


def run_layers(backbone: nnx.Module, x: jax.Array, outputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Runs ``backbone.layer1..4`` on the stem's output ``x``, adding their outputs as ``stage2..5``."""
    for index, layer in enumerate((backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)):
        for block in layer:
            x = layers.call_block(block, x, backbone.remat)
        outputs[f"stage{index + 2}"] = x
    return outputs


class Bottleneck(nnx.Module):
    """torchvision Bottleneck: 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), each followed by BN; residual + ReLU."""

    def __init__(
        self,
        in_features: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        downsample: bool = False,
        bn_kwargs: dict,
        dtype=jnp.float32,
        rngs: nnx.Rngs | layers.KernelInitializer,
    ):
        out_features = planes * EXPANSION
        self.conv1 = layers.Conv2d(in_features, planes, 1, dtype=dtype, rngs=rngs)
        self.bn1 = layers.BatchNorm(planes, **bn_kwargs)
        self.conv2 = layers.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, dtype=dtype, rngs=rngs
        )
        self.bn2 = layers.BatchNorm(planes, **bn_kwargs)
        self.conv3 = layers.Conv2d(planes, out_features, 1, dtype=dtype, rngs=rngs)
        self.bn3 = layers.BatchNorm(out_features, **bn_kwargs)
        if downsample:
            self.downsample = nnx.List(
                [
                    layers.Conv2d(in_features, out_features, 1, stride=stride, dtype=dtype, rngs=rngs),
                    layers.BatchNorm(out_features, **bn_kwargs),
                ]
            )
        else:
            self.downsample = None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else layers.apply_sequential(self.downsample, x)
        return jax.nn.relu(out + residual)


class ResNet(nnx.Module):
    """A Bottleneck ResNet backbone returning the five stage outputs.

    ``__call__`` maps an NHWC batch to ``{"stage1": ..., ..., "stage5": ...}`` where stage1 is
    conv1 -> bn1 -> ReLU -> 3x3/2 max-pool and stage2..5 are layer1..4.
    """

    def __init__(
        self,
        blocks_per_layer: Sequence[int],
        *,
        base_width: int = 64,
        output_stride: int = 16,
        bn_mode: str = "frozen",
        bn_group_size: int | None = None,
        bn_statistics: str = "two_pass",
        dtype=jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        """Creates the network.

        Args:
          blocks_per_layer: number of Bottleneck blocks in layer1..4 ([3, 4, 6, 3] for ResNet-50).
          base_width: stem channels and layer1 planes (64 for the ImageNet networks); layer k has
            base_width * 2**(k-1) planes and 4x that many output channels.
          output_stride: 8, 16 or 32 (see the module docstring).
          bn_mode: BatchNorm mode, one of ``layers.BN_MODES``.
          bn_group_size: images per BN statistics group for ``per_replica``.
          bn_statistics: how training BatchNorm computes batch statistics, one of ``layers.BN_STATISTICS``.
          dtype: compute dtype (parameters stay float32).
          remat: recompute each block's activations in the backward pass (``nnx.remat``).
          rngs: random generators for the initialisation.
        """
        check_output_stride(output_stride)
        # One key from rngs, all kernels drawn at once at the end (see layers.KernelInitializer).
        kernels = layers.KernelInitializer(rngs)
        bn_kwargs = dict(mode=bn_mode, group_size=bn_group_size, statistics=bn_statistics, dtype=dtype)
        self.remat = remat
        self.output_stride = output_stride
        self.conv1 = layers.Conv2d(3, base_width, 7, stride=2, padding=3, dtype=dtype, rngs=kernels)
        self.bn1 = layers.BatchNorm(base_width, **bn_kwargs)
        self.maxpool = layers.MaxPool2d(3, 2, 1)

        def make_block(in_features, planes, *, stride, dilation, downsample, layer_index, first):
            del layer_index, first  # the plain Bottleneck is the same in every layer
            return Bottleneck(
                in_features,
                planes,
                stride=stride,
                dilation=dilation,
                downsample=downsample,
                bn_kwargs=bn_kwargs,
                dtype=dtype,
                rngs=kernels,
            )

        stages, in_features = build_layers(
            make_block, blocks_per_layer, _RESNET_LAYER_GEOMETRY[output_stride], base_width, base_width
        )
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        kernels.finalize()
        self.out_features = in_features
        self.stage_features = (base_width,) + tuple(base_width * 2**i * EXPANSION for i in range(4))

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = x.astype(self.conv1.dtype)
        outputs = {}
        x = self.maxpool(jax.nn.relu(self.bn1(self.conv1(x))))
        outputs["stage1"] = x
        return run_layers(self, x, outputs)


# The narrow variants (base width 16: widths 16..128, outputs 64..512) train on a CPU: ``resnet_tiny`` (one block per
# layer) is the demo's backbone; ``resnet_small`` (two per layer, twice the depth at the same width) is the deeper
# backbone of the Puzzle-CAM-vs-CAM study (studies/puzzle_vs_cam.py).
RESNET_BLOCKS = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet_tiny": (1, 1, 1, 1),
    "resnet_small": (2, 2, 2, 2),
}
RESNET_BASE_WIDTH = {"resnet50": 64, "resnet101": 64, "resnet_tiny": 16, "resnet_small": 16}


def create_resnet(arch: str, **kwargs) -> ResNet:
    """Creates ``resnet50``, ``resnet101``, ``resnet_tiny`` or ``resnet_small``; ``kwargs`` go to ``ResNet``."""
    if arch not in RESNET_BLOCKS:
        raise ValueError(f"arch must be one of {tuple(RESNET_BLOCKS)}, got {arch!r}")
    return ResNet(RESNET_BLOCKS[arch], base_width=RESNET_BASE_WIDTH[arch], **kwargs)
