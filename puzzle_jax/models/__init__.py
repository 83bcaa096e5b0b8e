"""Model library: backbones (ResNet, ResNeSt) and the model families built on them, created by name or from a
model config.

Public API:
  * ``create_backbone(arch, *, output_stride=16, bn_mode="frozen", bn_group_size=None, dtype=jnp.float32,
    remat=False, rngs)``: an NNX module mapping an NHWC batch to ``{"stage1": ..., ..., "stage5": ...}``.
  * ``create_classifier(arch, num_classes, *, rngs, <create_backbone's keywords>)``: a ``Classifier`` whose call returns
    ``(logits (B, C), class_maps (B, h, w, C))``.
  * ``create_affinity_net(arch, *, dtype=jnp.float32, rngs)``: an ``AffinityNet`` (spec §8) on a frozen output-stride
    16 backbone, whose call returns edge logits (B, ceil(H / 4), ceil(W / 4)).
  * ``create_deeplab(arch, num_classes, *, use_gn=True, dtype=jnp.float32, remat=False, rngs)``: a ``DeepLabV3Plus``
    (spec §9) on a frozen output-stride 16 backbone, whose call ``model(images, dropout_key=None)`` returns
    logits (B, H, W, num_classes) at the input size.
  * **Model configs**, the schema an exported model records (``checkpointing.export_model``) and from which any
    model is rebuilt: a JSON-serialisable dict whose ``family`` field names the model family (``MODEL_FAMILIES``)
    and whose other fields are that family's constructor arguments. ``classifier_config(...)`` writes (and checks)
    one for the Puzzle-CAM classifier, ``affinity_config(...)`` one for AffinityNet, ``segmentation_config(...)``
    one for DeepLabv3+ (family ``segmentation``); ``create_model(model_config,
    rngs=...)`` builds any family's model from one.
    Configs exported before families were recorded have no ``family`` and are classifiers.
  * ``ARCHITECTURES``, ``OUTPUT_STRIDES``, ``BN_MODES``, ``BN_STATISTICS``, ``GROUPED_CONV_IMPLEMENTATIONS``,
    ``DTYPES``: the accepted values.

Every model holds only ``nnx.Param`` and ``nnx.BatchStat`` variables, so
``nnx.split(model, nnx.Param, nnx.BatchStat)`` is exhaustive, and keeps its backbone under the attribute ``model``
(the optimizer's pretrained/scratch groups and ``init_from`` rely on that path).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from puzzle_jax.models import resnest, resnet
from puzzle_jax.models.affinity import AffinityNet
from puzzle_jax.models.classifier import Classifier
from puzzle_jax.models.deeplab import DeepLabV3Plus
from puzzle_jax.models.layers import BN_MODES, BN_STATISTICS, BatchNorm
from puzzle_jax.models.resnest import GROUPED_CONV_IMPLEMENTATIONS, ResNeSt
from puzzle_jax.models.resnet import OUTPUT_STRIDES, ResNet

ARCHITECTURES = tuple(resnet.RESNET_BLOCKS) + tuple(resnest.RESNEST_BLOCKS)
# Compute dtypes by the name a model config stores (parameters and BatchNorm statistics stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The family a model config without a "family" field belongs to (exports written before families were recorded).
LEGACY_FAMILY = "classifier"

__all__ = [
    "ARCHITECTURES",
    "AffinityNet",
    "BN_MODES",
    "BN_STATISTICS",
    "GROUPED_CONV_IMPLEMENTATIONS",
    "OUTPUT_STRIDES",
    "DTYPES",
    "MODEL_FAMILIES",
    "BatchNorm",
    "Classifier",
    "DeepLabV3Plus",
    "ResNeSt",
    "ResNet",
    "affinity_config",
    "classifier_config",
    "create_affinity_net",
    "create_backbone",
    "create_classifier",
    "create_deeplab",
    "create_model",
    "model_family",
    "segmentation_config",
    "set_remat",
]


def _check_arguments(arch: str, output_stride: int, bn_mode: str, bn_group_size: int | None) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    if bn_mode == "per_replica" and (not isinstance(bn_group_size, int) or bn_group_size < 1):
        raise ValueError(f"bn_group_size must be a positive int when bn_mode='per_replica', got {bn_group_size!r}")


def _check_programs(arch: str, bn_statistics: str, grouped_conv: str) -> None:
    if bn_statistics not in BN_STATISTICS:
        raise ValueError(f"model.bn_statistics={bn_statistics!r}; allowed values are {list(BN_STATISTICS)}.")
    if grouped_conv not in GROUPED_CONV_IMPLEMENTATIONS:
        raise ValueError(
            f"model.grouped_conv={grouped_conv!r}; allowed values are {list(GROUPED_CONV_IMPLEMENTATIONS)}."
        )
    if grouped_conv != "grouped" and arch in resnet.RESNET_BLOCKS:
        raise ValueError(
            f"model.grouped_conv={grouped_conv!r} applies to ResNeSt backbones; {arch} has no grouped convolutions "
            "(leave it at 'grouped')."
        )


def create_backbone(
    arch: str,
    *,
    output_stride: int = 16,
    bn_mode: str = "frozen",
    bn_group_size: int | None = None,
    bn_statistics: str = "two_pass",
    grouped_conv: str = "grouped",
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
      bn_statistics: how training BatchNorm computes batch statistics (``BN_STATISTICS``; same values, other program).
      grouped_conv: ResNeSt's grouped-convolution program (``GROUPED_CONV_IMPLEMENTATIONS``; same function); ResNets
        have no grouped convolutions and take only the default.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters and BN statistics stay float32.
      remat: recompute each residual block's activations in the backward pass.
      rngs: random generators for the initialisation (not stored).

    Returns:
      The backbone, in training behaviour (call ``.eval()`` for inference). It maps an NHWC float batch
      to ``{"stage1": ..., ..., "stage5": ...}`` and exposes ``out_features`` (stage5 channels) and
      ``stage_features`` (channels of the five stages).

    Raises:
      ValueError: unknown ``arch``, ``output_stride``, ``bn_mode``, ``bn_statistics`` or ``grouped_conv``, or a
        missing ``bn_group_size``.
    """
    _check_arguments(arch, output_stride, bn_mode, bn_group_size)
    _check_programs(arch, bn_statistics, grouped_conv)
    kwargs = dict(
        output_stride=output_stride,
        bn_mode=bn_mode,
        bn_group_size=bn_group_size,
        bn_statistics=bn_statistics,
        dtype=dtype,
        remat=remat,
        rngs=rngs,
    )
    if arch in resnet.RESNET_BLOCKS:
        return resnet.create_resnet(arch, **kwargs)
    return resnest.create_resnest(arch, grouped_conv=grouped_conv, **kwargs)


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


def classifier_config(
    *,
    arch: str,
    num_classes: int,
    output_stride: int = 16,
    bn_mode: str = "frozen",
    bn_group_size: int | None = None,
    dtype: str = "float32",
    remat: bool = False,
    bn_statistics: str = "two_pass",
    grouped_conv: str = "grouped",
) -> dict[str, Any]:
    """The model config of a Puzzle-CAM classifier (``create_classifier``'s arguments, JSON-serialisable).

    Args:
      arch, num_classes, output_stride, bn_mode, bn_statistics, grouped_conv: as in ``create_classifier``.
      bn_group_size: images per BatchNorm group; kept only for ``bn_mode="per_replica"``.
      dtype: a key of ``DTYPES``.
      remat: recompute each residual block's activations in the backward pass.

    Raises:
      ValueError: for a value ``create_classifier`` would not accept, naming the field.
    """
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r}; allowed values are {list(DTYPES)}.")
    if not isinstance(remat, bool):
        raise ValueError(f"model.remat={remat!r}; a model config takes True or False.")
    group_size = int(bn_group_size) if bn_mode == "per_replica" and bn_group_size is not None else None
    _check_arguments(arch, int(output_stride), bn_mode, group_size)
    _check_programs(arch, bn_statistics, grouped_conv)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return {
        "family": "classifier",
        "arch": arch,
        "num_classes": num_classes,
        "output_stride": int(output_stride),
        "bn_mode": bn_mode,
        "bn_group_size": group_size,
        "dtype": dtype,
        "remat": remat,
        "bn_statistics": bn_statistics,
        "grouped_conv": grouped_conv,
    }


def _create_classifier_from_config(model_config: Mapping[str, Any], rngs: nnx.Rngs) -> Classifier:
    return create_classifier(
        model_config["arch"],
        int(model_config["num_classes"]),
        output_stride=int(model_config["output_stride"]),
        bn_mode=model_config["bn_mode"],
        bn_group_size=model_config["bn_group_size"],
        dtype=DTYPES[model_config["dtype"]],
        remat=bool(model_config["remat"]),
        # Exports written before these fields existed ran the defaults.
        bn_statistics=model_config.get("bn_statistics", "two_pass"),
        grouped_conv=model_config.get("grouped_conv", "grouped"),
        rngs=rngs,
    )


def create_affinity_net(arch: str, *, dtype=jnp.float32, rngs: nnx.Rngs) -> AffinityNet:
    """Creates AffinityNet (spec §8): ``create_backbone(arch)`` at output stride 16 with frozen BatchNorm under
    ``model``, plus the edge branches.

    Args:
      arch: one of ``ARCHITECTURES``.
      dtype: compute dtype of the backbone and the branches; parameters and statistics stay float32.
      rngs: random generators for the initialisation (not stored).
    """
    backbone = create_backbone(arch, output_stride=16, bn_mode="frozen", dtype=dtype, rngs=rngs)
    return AffinityNet(backbone, dtype=dtype, rngs=rngs)


def affinity_config(*, arch: str, dtype: str = "float32") -> dict[str, Any]:
    """The model config of AffinityNet (``create_affinity_net``'s arguments, JSON-serialisable).

    The output stride (16) and the BatchNorm mode (frozen) are fixed by the model; ``remat`` is recorded as False
    because no backward pass runs through the frozen backbone, so there is nothing to recompute (the driver reads
    the field of every family).

    Raises:
      ValueError: for an unknown ``arch`` or ``dtype``, naming the field.
    """
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r}; allowed values are {list(DTYPES)}.")
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.arch={arch!r}; allowed values are {list(ARCHITECTURES)}.")
    return {"family": "affinity", "arch": arch, "dtype": dtype, "remat": False}


def _create_affinity_net_from_config(model_config: Mapping[str, Any], rngs: nnx.Rngs) -> AffinityNet:
    return create_affinity_net(model_config["arch"], dtype=DTYPES[model_config["dtype"]], rngs=rngs)


def create_deeplab(
    arch: str,
    num_classes: int,
    *,
    use_gn: bool = True,
    head_features: int = 256,
    low_level_features: int = 48,
    dtype=jnp.float32,
    remat: bool = False,
    rngs: nnx.Rngs,
) -> DeepLabV3Plus:
    """Creates DeepLabv3+ (spec §9): ``create_backbone(arch)`` at output stride 16 with frozen BatchNorm under
    ``model``, plus the ASPP and the decoder.

    Args:
      arch: one of ``ARCHITECTURES``.
      num_classes: classes of the segmentation, background included (21 for VOC).
      use_gn: GroupNorm(4 groups) in the head (the authors' README setting), else frozen BatchNorm.
      head_features, low_level_features: the head's widths (the authors' 256 and 48; ``DeepLabV3Plus``).
      dtype: compute dtype of the backbone and the head; parameters and statistics stay float32.
      remat: recompute each residual block's activations in the backward pass (the backbone is trained).
      rngs: random generators for the initialisation (not stored).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    backbone = create_backbone(arch, output_stride=16, bn_mode="frozen", dtype=dtype, remat=remat, rngs=rngs)
    return DeepLabV3Plus(
        backbone,
        num_classes,
        use_gn=use_gn,
        head_features=head_features,
        low_level_features=low_level_features,
        dtype=dtype,
        rngs=rngs,
    )


def segmentation_config(
    *,
    arch: str,
    num_classes: int,
    use_gn: bool = True,
    head_features: int = 256,
    low_level_features: int = 48,
    dtype: str = "float32",
    remat: bool = False,
) -> dict[str, Any]:
    """The model config of DeepLabv3+ (``create_deeplab``'s arguments, JSON-serialisable; family
    ``segmentation``). The output stride (16) and the backbone's BatchNorm mode (frozen) are fixed by the model.

    Raises:
      ValueError: for a value ``create_deeplab`` would not accept, naming the field.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.arch={arch!r}; allowed values are {list(ARCHITECTURES)}.")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"model.num_classes={num_classes!r}; a positive int (21 for VOC, background included).")
    if not isinstance(use_gn, bool):
        raise ValueError(f"model.use_gn={use_gn!r}; a model config takes True or False.")
    for name, value in (("head_features", head_features), ("low_level_features", low_level_features)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (use_gn and value % 4):
            raise ValueError(f"seg.{name}={value!r}; a positive int, a multiple of 4 with GroupNorm (seg.use_gn).")
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r}; allowed values are {list(DTYPES)}.")
    if not isinstance(remat, bool):
        raise ValueError(f"model.remat={remat!r}; a model config takes True or False.")
    return {
        "family": "segmentation",
        "arch": arch,
        "num_classes": num_classes,
        "use_gn": use_gn,
        "head_features": head_features,
        "low_level_features": low_level_features,
        "dtype": dtype,
        "remat": remat,
    }


def _create_deeplab_from_config(model_config: Mapping[str, Any], rngs: nnx.Rngs) -> DeepLabV3Plus:
    return create_deeplab(
        model_config["arch"],
        int(model_config["num_classes"]),
        use_gn=bool(model_config["use_gn"]),
        head_features=int(model_config.get("head_features", 256)),
        low_level_features=int(model_config.get("low_level_features", 48)),
        dtype=DTYPES[model_config["dtype"]],
        remat=bool(model_config["remat"]),
        rngs=rngs,
    )


# Family name -> builder from a model config.
_FAMILY_BUILDERS: dict[str, Callable[[Mapping[str, Any], nnx.Rngs], nnx.Module]] = {
    "classifier": _create_classifier_from_config,
    "affinity": _create_affinity_net_from_config,
    "segmentation": _create_deeplab_from_config,
}
MODEL_FAMILIES = tuple(_FAMILY_BUILDERS)


def model_family(model_config: Mapping[str, Any]) -> str:
    """The family of a model config (``LEGACY_FAMILY`` when it records none)."""
    return model_config.get("family", LEGACY_FAMILY)


def create_model(model_config: Mapping[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model a model config describes (in training behaviour; ``.eval()`` for inference).

    Raises:
      ValueError: for an unknown family.
    """
    family = model_family(model_config)
    if family not in _FAMILY_BUILDERS:
        raise ValueError(f"Unknown model family {family!r}; known families are {list(MODEL_FAMILIES)}.")
    return _FAMILY_BUILDERS[family](model_config, rngs)


def set_remat(model: nnx.Module, remat: bool) -> None:
    """Turns activation recomputation of the model's backbone (the ``model`` attribute) on or off.

    It is a static attribute: a step traced after the call recomputes or not.
    """
    model.model.remat = bool(remat)
