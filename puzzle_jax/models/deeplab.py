"""DeepLabv3+ (spec §9): the segmenter trained on the pseudo masks, an ASPP and a decoder on a backbone.

The backbone is the attribute ``model`` (so the optimizer's path rule puts it in the pretrained groups and everything
else, ``aspp`` and ``decoder``, in the scratch groups at 10x/20x the learning rate, and ``init_from`` copies it), at
output stride 16 with BatchNorm in ``frozen`` mode (the authors' ``fix`` mode: running statistics always, trainable
scale and bias). Unlike AffinityNet's, the backbone is trained: gradients flow through it.

Head, with the authors' attribute names and ``nn.Sequential`` indices, so their state-dict keys are our paths
(``decoder.classifier.4.weight`` is ``decoder/classifier/4/kernel``; parameter-free placeholders hold the indices):
  * ``aspp`` on stage5: ``aspp1`` (1x1), ``aspp2``..``aspp4`` (3x3 at dilation 6, 12, 18), each conv -> norm -> ReLU
    (``atrous_conv``, ``bn``), and ``global_avg_pool`` (average over the map -> 1x1 -> norm -> ReLU, then bilinearly
    upsampled with aligned corners, i.e. broadcast); 256 channels each, concatenated (1280) -> ``conv1`` (1x1, 256)
    -> ``bn1`` -> ReLU -> dropout 0.5.
  * ``decoder``: stage2 (the authors' layer1 output, stride 4) -> ``conv1`` (1x1, 48) -> ``bn1`` -> ReLU; the ASPP
    output upsampled bilinearly (aligned corners) to stage2's size and concatenated before it (256 + 48) ->
    ``classifier``: 3x3 to 256, norm, ReLU, dropout 0.5, 3x3 to 256, norm, ReLU, dropout 0.1, 1x1 to the classes
    with a bias. Every other convolution has no bias.
  * The logits are upsampled bilinearly with aligned corners to the input size.
The norm (``bn``, ``bn1`` and the norms inside the sequences) is GroupNorm(4 groups) with ``use_gn`` (the authors'
README setting), otherwise a frozen BatchNorm like the backbone's (fresh statistics 0 and 1, which never change).

Initialisation as the authors': head convolutions Kaiming-normal with torch's ``kaiming_normal_`` defaults (fan_in,
gain sqrt(2)), norms scale 1 and bias 0; the final convolution's bias, which their ``initialize`` does not touch,
keeps torch's default (uniform in +-1/sqrt(fan_in)).

Dropout is torch's ``nn.Dropout`` (element-wise, survivors scaled by 1/(1-p)), applied only when the call is given a
``dropout_key``; without one the model is deterministic (inference). The model holds no random state: this keeps
every variable an ``nnx.Param`` or ``nnx.BatchStat``. Since every norm is frozen or GroupNorm, ``train()`` and
``eval()`` change nothing here; the key alone decides training behaviour.

Sizes: stage2 is ceil(n / 4) and stage5 ceil(n / 16) for an input side n. Aligned-corner upsampling maps the first
and last positions of the small map onto the first and last pixels, so for a side that is not a multiple of 4 the
final upsample stretches the stride-4 grid slightly (by (n - 1) / (4 * (ceil(n / 4) - 1)) rather than 4), exactly as
the authors' ``resize_for_tensors(x, image_size, align_corners=True)`` does.

Deviation from the authors, harmless: the ASPP's and the decoder's input channels come from the backbone
(``backbone.stage_features``: 2048 and 256 for every full-size network, as they hard-code) so that the narrow test
backbones work, and the head's widths (256 and 48) are arguments with the authors' values as defaults, so that a
narrow CPU model (the demo's) need not carry a full-size head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from puzzle_jax.models import layers

# The backbone's output stride the ASPP rates are set for (the authors build DeepLab at 16 only).
OUTPUT_STRIDE = 16
# Dilation rates of the three 3x3 ASPP branches at output stride 16.
ASPP_RATES = (6, 12, 18)
# Channels of every ASPP branch, of the ASPP output and of the decoder's 3x3 convolutions (the authors'; the model
# takes others, ``head_features``, for narrow CPU models).
HEAD_FEATURES = 256
# Channels the low-level (stage2) features are reduced to (``low_level_features``).
LOW_LEVEL_FEATURES = 48
# Dropout rates: after the ASPP, after the decoder's first and second 3x3 convolutions.
ASPP_DROPOUT = 0.5
DECODER_DROPOUTS = (0.5, 0.1)
# GroupNorm of the head (the authors' group_norm: nn.GroupNorm(4, features), torch's epsilon).
GROUP_NORM_GROUPS = 4
GROUP_NORM_EPSILON = 1e-5


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """``torch.nn.Dropout(rate)`` in training: each element is zeroed with probability ``rate`` and the others are
    scaled by 1 / (1 - rate). Identity when ``key`` is None."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nnx.Module):
    """Parameter-free dropout placeholder (static ``rate``); the key comes with the call."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        return dropout(x, self.rate, key)


class GlobalAveragePool(nnx.Module):
    """Parameter-free ``nn.AdaptiveAvgPool2d((1, 1))`` (NHWC), a placeholder at the authors' index 0."""

    def __call__(self, x: jax.Array) -> jax.Array:
        # The mean in float32 at least, so that a bfloat16 map's average is not rounded term by term.
        return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2), keepdims=True).astype(x.dtype)


def _norm(features: int, *, use_gn: bool, dtype, rngs: nnx.Rngs) -> nnx.Module:
    """The head's norm: GroupNorm(4 groups) or a frozen BatchNorm (running statistics 0 and 1, never updated)."""
    if use_gn:
        # Two-pass variance, as torch computes it.
        return nnx.GroupNorm(
            features,
            num_groups=GROUP_NORM_GROUPS,
            epsilon=GROUP_NORM_EPSILON,
            use_fast_variance=False,
            dtype=dtype,
            rngs=rngs,
        )
    return layers.BatchNorm(features, mode="frozen", dtype=dtype)


def _conv(in_features, out_features, kernel_size, *, dilation=1, dtype, kernels) -> layers.Conv2d:
    """A bias-free head convolution, Kaiming-normal (fan_in, gain sqrt(2)) like torch's ``kaiming_normal_``."""
    return layers.Conv2d(
        in_features,
        out_features,
        kernel_size,
        padding=dilation * (kernel_size // 2),
        dilation=dilation,
        init_mode="fan_in",
        dtype=dtype,
        rngs=kernels,
    )


class ASPPBranch(nnx.Module):
    """The authors' ``ASPPModule``: a (dilated) convolution without bias, the norm, ReLU."""

    def __init__(
        self, in_features: int, features: int, kernel_size: int, dilation: int, *, use_gn: bool, dtype, rngs, kernels
    ):
        self.atrous_conv = _conv(in_features, features, kernel_size, dilation=dilation, dtype=dtype, kernels=kernels)
        self.bn = _norm(features, use_gn=use_gn, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.atrous_conv(x)))


class ASPP(nnx.Module):
    """Atrous spatial pyramid pooling on stage5 (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        use_gn: bool,
        dtype,
        rngs: nnx.Rngs,
        kernels: layers.KernelInitializer,
    ):
        options = dict(use_gn=use_gn, dtype=dtype, rngs=rngs, kernels=kernels)
        self.aspp1 = ASPPBranch(in_features, features, 1, 1, **options)
        self.aspp2 = ASPPBranch(in_features, features, 3, ASPP_RATES[0], **options)
        self.aspp3 = ASPPBranch(in_features, features, 3, ASPP_RATES[1], **options)
        self.aspp4 = ASPPBranch(in_features, features, 3, ASPP_RATES[2], **options)
        self.global_avg_pool = nnx.List(
            [
                GlobalAveragePool(),
                _conv(in_features, features, 1, dtype=dtype, kernels=kernels),
                _norm(features, use_gn=use_gn, dtype=dtype, rngs=rngs),
                layers.ReLU(),
            ]
        )
        self.conv1 = _conv(5 * features, features, 1, dtype=dtype, kernels=kernels)
        self.bn1 = _norm(features, use_gn=use_gn, dtype=dtype, rngs=rngs)
        self.dropout = Dropout(ASPP_DROPOUT)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        branches = [self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x)]
        pooled = layers.apply_sequential(self.global_avg_pool, x)
        branches.append(layers.resize_bilinear_align_corners(pooled, x.shape[1:3]))
        y = jax.nn.relu(self.bn1(self.conv1(jnp.concatenate(branches, axis=-1))))
        return self.dropout(y, dropout_key)


class Decoder(nnx.Module):
    """The DeepLabv3+ decoder on the ASPP output and the stride-4 features (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        features: int,
        low_level_features: int,
        use_gn: bool,
        dtype,
        rngs: nnx.Rngs,
        kernels: layers.KernelInitializer,
    ):
        self.conv1 = _conv(in_features, low_level_features, 1, dtype=dtype, kernels=kernels)
        self.bn1 = _norm(low_level_features, use_gn=use_gn, dtype=dtype, rngs=rngs)
        final = layers.Conv2d(features, num_classes, 1, use_bias=True, init_mode="fan_in", dtype=dtype, rngs=kernels)
        # torch's default bias of a fresh nn.Conv2d (the authors' initialize sets only the weight).
        bound = 1.0 / math.sqrt(features)
        final.bias.set_value(jax.random.uniform(rngs.params(), (num_classes,), jnp.float32, -bound, bound))
        self.classifier = nnx.List(
            [
                _conv(features + low_level_features, features, 3, dtype=dtype, kernels=kernels),
                _norm(features, use_gn=use_gn, dtype=dtype, rngs=rngs),
                layers.ReLU(),
                Dropout(DECODER_DROPOUTS[0]),
                _conv(features, features, 3, dtype=dtype, kernels=kernels),
                _norm(features, use_gn=use_gn, dtype=dtype, rngs=rngs),
                layers.ReLU(),
                Dropout(DECODER_DROPOUTS[1]),
                final,
            ]
        )

    def __call__(self, x: jax.Array, low_level: jax.Array, dropout_keys=(None, None)) -> jax.Array:
        low_level = jax.nn.relu(self.bn1(self.conv1(low_level)))
        x = layers.resize_bilinear_align_corners(x, low_level.shape[1:3])
        x = jnp.concatenate([x, low_level], axis=-1)
        keys = iter(dropout_keys)
        for layer in self.classifier:
            x = layer(x, next(keys)) if isinstance(layer, Dropout) else layer(x)
        return x


class DeepLabV3Plus(nnx.Module):
    """Backbone (``model``) + ``aspp`` + ``decoder``; the call returns per-pixel class logits at the input size."""

    def __init__(
        self,
        backbone: nnx.Module,
        num_classes: int,
        *,
        use_gn: bool = True,
        head_features: int = HEAD_FEATURES,
        low_level_features: int = LOW_LEVEL_FEATURES,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        """Creates the network.

        Args:
          backbone: a module returning ``{"stage1": ..., "stage5": ...}`` at output stride 16 (BatchNorm ``frozen``
            for the authors' setting), exposing ``stage_features`` (the channels of the five stages).
          num_classes: classes of the segmentation, background included (21 for VOC).
          use_gn: GroupNorm(4 groups) in the head (the authors' README setting), else frozen BatchNorm.
          head_features: channels of the ASPP's branches and output and of the decoder's 3x3 convolutions (the
            authors' 256); a multiple of 4 with GroupNorm.
          low_level_features: channels of the decoder's low-level projection (the authors' 48); a multiple of 4 with
            GroupNorm.
          dtype: compute dtype of the head (parameters and statistics float32).
          rngs: random generators for the head's initialisation (not stored).
        """
        if getattr(backbone, "output_stride", OUTPUT_STRIDE) != OUTPUT_STRIDE:
            raise ValueError(f"DeepLabV3Plus needs a backbone at output stride {OUTPUT_STRIDE}.")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.model = backbone
        self.num_classes = num_classes
        self.use_gn = use_gn
        self.dtype = dtype
        # One key for all head kernels (see layers.KernelInitializer).
        kernels = layers.KernelInitializer(rngs)
        self.aspp = ASPP(
            backbone.stage_features[4], head_features, use_gn=use_gn, dtype=dtype, rngs=rngs, kernels=kernels
        )
        self.decoder = Decoder(
            backbone.stage_features[1],
            num_classes,
            features=head_features,
            low_level_features=low_level_features,
            use_gn=use_gn,
            dtype=dtype,
            rngs=rngs,
            kernels=kernels,
        )
        kernels.finalize()

    def __call__(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Per-pixel class logits.

        Args:
          images: (B, H, W, 3) normalised float images.
          dropout_key: a PRNG key turns the three dropouts on (training); None (inference) leaves them off and the
            call deterministic.

        Returns:
          (B, H, W, num_classes) logits, float32 (float64 for a float64 model) whatever the compute dtype.
        """
        stages = self.model(images)
        if dropout_key is None:
            keys = (None, None, None)
        else:
            keys = tuple(jax.random.split(dropout_key, 3))
        x = self.aspp(stages["stage5"], keys[0])
        x = self.decoder(x, stages["stage2"], keys[1:])
        # The last upsample in float32: the logits feed the loss and the argmax at full resolution.
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        return layers.resize_bilinear_align_corners(x, images.shape[1:3])
