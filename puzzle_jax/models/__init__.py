"""Model library: backbones (ResNet, ResNeSt) and the Puzzle-CAM classifier, created by name.

Public API:
  * ``create_backbone(arch, *, output_stride=16, bn_mode="frozen", bn_group_size=None, dtype=jnp.float32,
    remat=False, rngs)``: an NNX module mapping an NHWC batch to ``{"stage1": ..., ..., "stage5": ...}``.
  * ``create_classifier(arch, num_classes, *, rngs, <create_backbone's keywords>)``: a ``Classifier`` whose call returns
    ``(logits (B, C), class_maps (B, h, w, C))``.
  * ``ARCHITECTURES``, ``OUTPUT_STRIDES``, ``BN_MODES``: the accepted values.

Every model holds only ``nnx.Param`` and ``nnx.BatchStat`` variables, so
``nnx.split(model, nnx.Param, nnx.BatchStat)`` is exhaustive.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from puzzle_jax.models import resnest, resnet
from puzzle_jax.models.classifier import Classifier
from puzzle_jax.models.layers import BN_MODES, BatchNorm
from puzzle_jax.models.resnest import ResNeSt
from puzzle_jax.models.resnet import OUTPUT_STRIDES, ResNet

ARCHITECTURES = tuple(resnet.RESNET_BLOCKS) + tuple(resnest.RESNEST_BLOCKS)

__all__ = [
    "ARCHITECTURES",
    "BN_MODES",
    "OUTPUT_STRIDES",
    "BatchNorm",
    "Classifier",
    "ResNeSt",
    "ResNet",
    "create_backbone",
    "create_classifier",
]


def _check_arguments(arch: str, output_stride: int, bn_mode: str, bn_group_size: int | None) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    if bn_mode == "per_replica" and (not isinstance(bn_group_size, int) or bn_group_size < 1):
        raise ValueError(
            f"bn_group_size must be a positive int when bn_mode='per_replica', got {bn_group_size!r}"
        )


def create_backbone(
    arch: str,
    *,
    output_stride: int = 16,
    bn_mode: str = "frozen",
    bn_group_size: int | None = None,
    dtype=jnp.float32,
    remat: bool = False,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Creates a backbone by name.

    Args:
      arch: one of ``ARCHITECTURES``.
      output_stride: 8, 16 (the authors' setting) or 32; see ``resnet`` / ``resnest`` for how each is built.
      bn_mode: ``"global"``, ``"per_replica"`` or ``"frozen"`` (see ``layers.BatchNorm``).
      bn_group_size: images per BN statistics group, required for ``"per_replica"``.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters and BN statistics stay float32.
      remat: recompute each residual block's activations in the backward pass.
      rngs: random generators for the initialisation (not stored).

    Returns:
      The backbone, in training behaviour (call ``.eval()`` for inference). It maps an NHWC float batch
      to ``{"stage1": ..., ..., "stage5": ...}`` and exposes ``out_features`` (stage5 channels) and
      ``stage_features`` (channels of the five stages).

    Raises:
      ValueError: unknown ``arch``, ``output_stride`` or ``bn_mode``, or a missing ``bn_group_size``.
    """
    _check_arguments(arch, output_stride, bn_mode, bn_group_size)
    kwargs = dict(
        output_stride=output_stride,
        bn_mode=bn_mode,
        bn_group_size=bn_group_size,
        dtype=dtype,
        remat=remat,
        rngs=rngs,
    )
    if arch in resnet.RESNET_BLOCKS:
        return resnet.create_resnet(arch, **kwargs)
    return resnest.create_resnest(arch, **kwargs)


def create_classifier(arch: str, num_classes: int, *, rngs: nnx.Rngs, **backbone_options) -> Classifier:
    """Creates the Puzzle-CAM classifier: ``create_backbone(arch, **backbone_options)`` under ``model`` + a 1x1 head.

    Args:
      arch: one of ``ARCHITECTURES``.
      num_classes: number of foreground classes.
      rngs: random generators for the initialisation (not stored).
      **backbone_options: ``create_backbone``'s keywords (``output_stride``, ``bn_mode``, ``bn_group_size``,
        ``dtype``, ``remat``); the head computes in the same ``dtype``.

    Returns:
      A ``Classifier``; ``classifier(images)`` returns ``(logits, class_maps)``.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    backbone = create_backbone(arch, rngs=rngs, **backbone_options)
    return Classifier(backbone, num_classes, dtype=backbone_options.get("dtype", jnp.float32), rngs=rngs)
