"""AffinityNet (spec §8): IRNet's boundary branch on a frozen backbone, one edge logit per stride-4 position.

The backbone (attribute ``model``, so ``init_from`` and the optimizer's path rules see it as the backbone) runs with
BatchNorm in ``frozen`` mode (running statistics: the authors' ``fix`` mode and their ``backbone.eval()``), and every
stage output passes through ``jax.lax.stop_gradient`` as the authors ``detach()`` them: no gradient reaches the
backbone, so no backward pass runs through it (JAX's symbolic zero cotangents prune it from the step).

Side branches ``fc_edge1``..``fc_edge5`` on stage1..stage5 (each a 1x1 conv without bias and GroupNorm(4 groups,
32 channels), then a bilinear upsample for stage3 (x2), stage4 and stage5 (x4), then ReLU) are cropped to
``fc_edge2``'s size and concatenated (160 channels); ``fc_edge6``, a 1x1 conv with bias, gives the edge logit.
Attribute names and list indices mirror the authors' state-dict keys (``fc_edge3.1.weight`` is
``fc_edge3/1/scale``).

Strides at output stride 16 (the only one this model is built with: the upsample factors assume it): stage1 (the
stem after the max-pool) and stage2 are stride 4, stage3 stride 8, stage4 and stage5 stride 16. An input side ``n``
that is not a multiple of 16 gives stage1/2 maps of ``ceil(n / 4)`` and stage3..5 maps of ``ceil`` sizes that,
upsampled, are at least as large, so the crop to edge2's size is always defined; the output is
``(B, ceil(H / 4), ceil(W / 4))``.

Deviation from the authors, harmless: ``fc_edge1``'s input channels come from the backbone
(``backbone.stage_features[0]``: 64 for the ResNets and ResNeSt-50, 128 for the deeper ResNeSts' wider stem); the
authors' rule "64 if '50' is in the architecture name, else 128" gives the same numbers for ResNet-50 and every
ResNeSt but breaks ResNet-101 (64 channels, not 128). The side branches are initialised as torch initialises a
fresh ``nn.Conv2d``/``nn.GroupNorm`` (uniform kernels and biases of bound 1/sqrt(fan_in), GroupNorm 1 and 0), as the
authors leave them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from puzzle_jax.models import layers

# Channels of every side branch and the groups of its GroupNorm (the authors' GroupNorm(4, 32)).
BRANCH_FEATURES = 32
BRANCH_GROUPS = 4
# Upsampling factor of each stage's branch to stride 4 (the backbone at output stride 16).
BRANCH_UPSAMPLING = (1, 1, 2, 4, 4)
# GroupNorm epsilon of torch.nn.GroupNorm.
GROUP_NORM_EPSILON = 1e-5
# The backbone's output stride the upsampling factors assume.
OUTPUT_STRIDE = 16
# Stride of the edge map.
EDGE_STRIDE = 4


def _torch_default_conv(in_features: int, out_features: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
    """A 1x1 ``layers.Conv2d`` initialised as a fresh ``torch.nn.Conv2d``: kernel and bias uniform in
    +-1/sqrt(fan_in) (torch's kaiming_uniform_ with a=sqrt(5) and its bias rule)."""
    conv = layers.Conv2d(in_features, out_features, 1, use_bias=use_bias, dtype=dtype, rngs=rngs)
    bound = 1.0 / math.sqrt(in_features)
    conv.kernel.set_value(jax.random.uniform(rngs.params(), conv.kernel.shape, jnp.float32, -bound, bound))
    if use_bias:
        conv.bias.set_value(jax.random.uniform(rngs.params(), conv.bias.shape, jnp.float32, -bound, bound))
    return conv


def upsample_bilinear(x: jax.Array, factor: int) -> jax.Array:
    """``torch.nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=False)`` for NHWC ``x``: half-pixel
    centres, border pixels repeated (``jax.image.resize``'s renormalised triangle kernel does the same at an integer
    upscale)."""
    if factor == 1:
        return x
    batch, height, width, channels = x.shape
    return jax.image.resize(x, (batch, height * factor, width * factor, channels), method="bilinear")


class AffinityNet(nnx.Module):
    """Frozen backbone (``model``) + the edge branches ``fc_edge1``..``fc_edge6``."""

    def __init__(self, backbone: nnx.Module, *, dtype=jnp.float32, rngs: nnx.Rngs):
        """Creates the network.

        Args:
          backbone: a module returning ``{"stage1": ..., "stage5": ...}`` at output stride 16, with BatchNorm in
            ``frozen`` mode, exposing ``stage_features`` (the channels of the five stages).
          dtype: compute dtype of the branches (parameters and GroupNorm statistics float32).
          rngs: random generators for the branches' initialisation.
        """
        if getattr(backbone, "output_stride", OUTPUT_STRIDE) != OUTPUT_STRIDE:
            raise ValueError(f"AffinityNet needs a backbone at output stride {OUTPUT_STRIDE}.")
        self.model = backbone
        self.dtype = dtype
        for index, in_features in enumerate(backbone.stage_features):
            branch = nnx.List(
                [
                    _torch_default_conv(in_features, BRANCH_FEATURES, use_bias=False, dtype=dtype, rngs=rngs),
                    nnx.GroupNorm(
                        BRANCH_FEATURES,
                        num_groups=BRANCH_GROUPS,
                        epsilon=GROUP_NORM_EPSILON,
                        # Two-pass variance, as torch computes it.
                        use_fast_variance=False,
                        dtype=dtype,
                        rngs=rngs,
                    ),
                ]
            )
            setattr(self, f"fc_edge{index + 1}", branch)
        branches = len(backbone.stage_features)
        self.fc_edge6 = _torch_default_conv(BRANCH_FEATURES * branches, 1, use_bias=True, dtype=dtype, rngs=rngs)

    def branches(self) -> tuple[nnx.List, ...]:
        return (self.fc_edge1, self.fc_edge2, self.fc_edge3, self.fc_edge4, self.fc_edge5)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Edge logits.

        Args:
          images: (B, H, W, 3) normalised float images.

        Returns:
          (B, ceil(H / 4), ceil(W / 4)) edge logits, float32 (float64 for a float64 model).
        """
        stages = self.model(images)
        # The authors detach every stage output: the backbone is a fixed feature extractor.
        features = [jax.lax.stop_gradient(stages[f"stage{index + 1}"]) for index in range(5)]
        height, width = features[1].shape[1:3]
        edges = []
        for branch, factor, feature in zip(self.branches(), BRANCH_UPSAMPLING, features, strict=True):
            conv, norm = branch
            edge = upsample_bilinear(norm(conv(feature)), factor)
            edges.append(jax.nn.relu(edge)[:, :height, :width])
        logits = self.fc_edge6(jnp.concatenate(edges, axis=-1))[..., 0]
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
