"""PyTorch state dict -> NNX model conversion, and the ``convert`` command line.

Supported sources (a file path, or an in-memory state dict of torch tensors or numpy arrays):
  * official ResNeSt ImageNet checkpoints (``resnest{50,101,200,269}-*.pth``) and timm's ``resnest50d``,
    ``resnest101e``, ``resnest200e``, ``resnest269e`` re-hosts of the same weights, which use the same keys;
  * torchvision ``resnet50-*.pth`` / ``resnet101-*.pth``;
  * the authors' released Puzzle-CAM classifier checkpoints: the backbone under ``model.``, the same tensors
    again under the aliases ``stage1.`` .. ``stage5.`` (ignored), the head in ``classifier.weight``, possibly
    everything under a ``module.`` prefix (``nn.DataParallel``).
Files: ``.pth``/``.pt``/``.bin`` (torch pickles, read with ``weights_only=True``: needs ``torch``) and
``.safetensors`` (needs ``safetensors``).

Because the NNX models mirror the torch attribute names, a torch key maps to an NNX path by splitting on dots
(``layer3.4.conv2.fc1.weight`` -> ``("layer3", 4, "conv2", "fc1", "kernel")``) and renaming the leaf: a conv's
``weight`` -> ``kernel`` (OIHW -> HWIO) and ``bias`` -> ``bias``; a BN's ``weight``/``bias``/``running_mean``/
``running_var`` -> ``scale``/``bias``/``mean``/``var``; ``num_batches_tracked`` is dropped. The ImageNet head
(``fc.*``) is dropped explicitly. Any other key without a target, any model variable without a value and any
shape difference raises ``WeightLoadingError`` listing all of them: nothing is silently left at its random
initialisation (except, by design, the head of a Classifier loaded from an ImageNet backbone checkpoint, which
the result reports).

CLI::

    python -m puzzle_jax.weights.convert --arch resnest101 --input resnest101-22405ba7.pth --output DIR

writes an exported model (``puzzle_jax.checkpointing.export_model``) of a full ``Classifier`` that
``config.train_cam.init_from=DIR`` (or another training section's ``init_from``) loads.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

_STAGE_ALIASES = tuple(f"stage{i}." for i in range(1, 6))
_IMAGENET_HEAD = ("fc.weight", "fc.bias")
_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module")


class WeightLoadingError(ValueError):
    """The state dict does not fit the model; the message lists every offending key."""


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Returns a flat ``{key: numpy array}`` from a checkpoint file or a state dict.

    Args:
      source: a ``.safetensors`` file, a torch pickle (``.pth``, ``.pt``, ``.bin``; loaded with
        ``weights_only=True``, so no code runs), or a mapping of names to tensors/arrays. A checkpoint that
        nests its state dict under ``state_dict``/``model_state_dict``/``model``/``module`` is unwrapped.

    Raises:
      ImportError: the file format needs ``torch`` or ``safetensors`` and it is not installed.
      WeightLoadingError: the source is not a mapping of names to arrays.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.endswith(".safetensors"):
            try:
                from safetensors.numpy import load_file
            except ImportError as error:
                raise ImportError("reading .safetensors files needs: pip install safetensors") from error
            source = load_file(path)
        else:
            try:
                import torch
            except ImportError as error:  # torch is a conversion/test dependency only
                raise ImportError(
                    "reading a torch checkpoint needs PyTorch: pip install torch (the CPU build is enough)"
                ) from error
            source = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(source, Mapping):
        raise WeightLoadingError(f"expected a state dict (a mapping of names to tensors), got {type(source)}")
    while not any(_is_array(value) for value in source.values()):
        nested = [source[key] for key in _WRAPPERS if isinstance(source.get(key), Mapping)]
        if not nested:
            raise WeightLoadingError(
                f"no tensors found at the top level of the checkpoint (keys: {sorted(source)[:10]})"
            )
        source = nested[0]
    arrays = {}
    for key, value in source.items():
        if not _is_array(value):
            raise WeightLoadingError(f"{key!r} is not a tensor ({type(value).__name__})")
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        arrays[str(key)] = np.asarray(value)
    return arrays


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _normalize_keys(
    state_dict: Mapping[str, np.ndarray], target_is_classifier: bool
) -> tuple[dict[str, np.ndarray], list[str], bool]:
    """Strips wrappers and drops the keys known not to be weights.

    Returns:
      ``(kept, dropped, authors_format)``: the keys to load, renamed to the target's layout; the keys ignored
      on purpose; whether the source is an authors' classifier checkpoint (``model.*`` keys).
    """
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    authors_format = any(key.startswith("model.") for key in state_dict)
    kept, dropped = {}, []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            dropped.append(key)
            continue
        if authors_format:
            # The authors' Backbone registers stage1..5 as nn.Sequential views of model.*: the same tensors
            # under a second name.
            if key.startswith(_STAGE_ALIASES):
                dropped.append(key)
                continue
            if key.startswith("classifier.") and not target_is_classifier:
                dropped.append(key)  # a backbone has no head to receive it
                continue
            if key.startswith("model."):
                if key[len("model.") :] in _IMAGENET_HEAD:
                    dropped.append(key)
                    continue
                name = key if target_is_classifier else key[len("model.") :]
            else:
                name = key
        else:
            if key in _IMAGENET_HEAD:
                dropped.append(key)  # the ImageNet classifier; our head (if any) is trained from scratch
                continue
            name = "model." + key if target_is_classifier else key
        kept[name] = value
    return kept, dropped, authors_format


def _torch_key_to_path(key: str, flat_paths: set[tuple]) -> tuple[tuple | None, str | None]:
    """Maps a torch key to (NNX path, kind) where kind is 'conv' or 'bn'; (None, None) if it has no target."""
    parts = tuple(int(part) if part.isdigit() else part for part in key.split("."))
    prefix, leaf = parts[:-1], parts[-1]
    if prefix + ("kernel",) in flat_paths:
        if leaf == "weight":
            return prefix + ("kernel",), "conv"
        if leaf == "bias" and prefix + ("bias",) in flat_paths:
            return prefix + ("bias",), "conv"
    elif leaf in _BN_LEAVES and prefix + ("scale",) in flat_paths:
        return prefix + (_BN_LEAVES[leaf],), "bn"
    return None, None


def _format_keys(title: str, keys: Sequence[str]) -> str:
    return f"{title} ({len(keys)}):\n  " + "\n  ".join(keys)


def _path_name(path: tuple) -> str:
    return "/".join(map(str, path))


def load_torch_weights(
    model: nnx.Module,
    source: str | os.PathLike | Mapping[str, Any],
    arch: str | None = None,
) -> dict[str, list[str]]:
    """Loads PyTorch weights into ``model`` in place.

    The model may be abstract (``nnx.eval_shape(lambda: create_backbone(...))``): every variable receives a
    value, so no time is spent on a random initialisation that the weights replace.

    Args:
      model: a backbone from ``create_backbone`` or a ``Classifier``. A Classifier loaded from an ImageNet
        checkpoint receives the backbone only and keeps its head's initialisation; a backbone loaded from an
        authors' classifier checkpoint ignores the head.
      source: a checkpoint file or a state dict (see ``read_state_dict``).
      arch: the architecture name, only used in error messages.

    Returns:
      ``{"loaded": [...], "dropped": [...], "initialised": [...]}``: the source keys loaded, those ignored on
      purpose (``num_batches_tracked``, ImageNet ``fc.*``, the authors' ``stage*`` aliases, a head that a
      backbone cannot take), and the model variables that keep their initialisation (only a Classifier's head
      when the source is an ImageNet backbone).

    Raises:
      WeightLoadingError: some keys are unknown to the model, some model variables get no value, or shapes
        differ; the message lists all of them.
    """
    from puzzle_jax.models.classifier import Classifier  # local: the models import nothing from here

    target_is_classifier = isinstance(model, Classifier)
    state_dict, dropped, authors_format = _normalize_keys(read_state_dict(source), target_is_classifier)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    flat_paths = set(flat)

    new_values, unexpected, mismatched, mismatched_paths, loaded = {}, [], [], set(), []
    for key, value in state_dict.items():
        path, kind = _torch_key_to_path(key, flat_paths)
        if path is None:
            unexpected.append(key)
            continue
        target_shape = tuple(flat[path].shape)
        is_kernel = kind == "conv" and len(target_shape) == 4
        # Compare in the torch layout, which is what the user's checkpoint shows.
        expected_shape = tuple(target_shape[i] for i in (3, 2, 0, 1)) if is_kernel else target_shape
        if tuple(value.shape) != expected_shape:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {expected_shape} (torch layout)")
            mismatched_paths.add(path)
            continue
        if is_kernel:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        new_values[path] = value.astype(np.float32)
        loaded.append(key)

    # An ImageNet backbone has no head for a Classifier: the head keeps its initialisation, by design.
    head_optional = target_is_classifier and not authors_format
    initialised, missing = [], []
    for path in sorted(flat_paths - set(new_values) - mismatched_paths, key=_path_name):
        if head_optional and path[0] == "classifier":
            initialised.append(_path_name(path))
        else:
            missing.append(_path_name(path))
    if unexpected or missing or mismatched:
        what = f" for arch {arch!r}" if arch else ""
        sections = [
            _format_keys("unexpected keys (no matching model variable)", unexpected) if unexpected else "",
            _format_keys("missing (model variables without a value)", missing) if missing else "",
            _format_keys("shape mismatches", mismatched) if mismatched else "",
        ]
        raise WeightLoadingError(
            f"state dict does not fit the model{what}:\n" + "\n".join(s for s in sections if s)
        )

    updates = {path: flat[path].replace(jnp.asarray(value)) for path, value in new_values.items()}
    nnx.update(model, nnx.from_flat_state(updates))
    return {"loaded": loaded, "dropped": dropped, "initialised": initialised}


def convert_checkpoint(
    arch: str,
    source: str | os.PathLike | Mapping[str, Any],
    output: str,
    *,
    num_classes: int | None = None,
    output_stride: int = 16,
    bn_mode: str = "frozen",
    seed: int = 0,
) -> dict:
    """Converts a torch checkpoint into an exported model (a full ``Classifier``) at ``output``.

    Args:
      arch: one of ``puzzle_jax.models.ARCHITECTURES``.
      source: checkpoint file or state dict.
      output: destination folder (must not exist).
      num_classes: classes of the head. Default: those of the checkpoint's head (an authors' checkpoint),
        else 20 (VOC) with a freshly initialised head, which ``init_from`` does not copy
        unless the training section's ``init_head``.
      output_stride, bn_mode: stored in the exported model config (they do not change the weights).
      seed: seed of the head initialisation when the checkpoint has no head.

    Returns:
      A summary: the model config, and the counts/lists of ``load_torch_weights``'s result.
    """
    from puzzle_jax import checkpointing
    from puzzle_jax.models import Classifier, classifier_config, create_backbone

    state_dict = read_state_dict(source)
    if num_classes is None:
        heads = [value for key, value in state_dict.items() if key.endswith("classifier.weight")]
        num_classes = int(heads[0].shape[0]) if heads else 20
    model_config = classifier_config(
        arch=arch, num_classes=num_classes, output_stride=output_stride, bn_mode=bn_mode
    )
    # An abstract backbone (all its weights come from the checkpoint: no time spent on a random init) under a
    # concrete head (which keeps its initialisation when the checkpoint has none).
    backbone = nnx.eval_shape(
        lambda: create_backbone(arch, output_stride=output_stride, bn_mode=bn_mode, rngs=nnx.Rngs(seed))
    )
    model = Classifier(backbone, num_classes, rngs=nnx.Rngs(seed))
    result = load_torch_weights(model, state_dict, arch=arch)
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    checkpointing.export_model(output, nnx.as_pure(params), nnx.as_pure(batch_stats), model_config)
    return {"model_config": model_config, **result}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    from puzzle_jax.models import ARCHITECTURES, OUTPUT_STRIDES

    parser = argparse.ArgumentParser(
        prog="python -m puzzle_jax.weights.convert",
        description="Convert official ResNet/ResNeSt ImageNet weights or an authors' Puzzle-CAM checkpoint "
        "into an exported puzzle_jax model (load it with --config.train_cam.init_from=OUTPUT).",
    )
    parser.add_argument("--arch", required=True, choices=ARCHITECTURES)
    parser.add_argument("--input", required=True, help=".pth/.pt/.bin (torch) or .safetensors file")
    parser.add_argument("--output", required=True, help="destination folder (must not exist)")
    parser.add_argument(
        "--num-classes", type=int, default=None,
        help="head classes (default: the checkpoint's head, else 20 with a fresh head)",
    )
    parser.add_argument("--output-stride", type=int, default=16, choices=OUTPUT_STRIDES)
    parser.add_argument("--seed", type=int, default=0, help="seed of a freshly initialised head")
    args = parser.parse_args(argv)

    if os.path.exists(args.output):
        parser.error(f"--output {args.output} already exists; choose a new folder")
    try:
        summary = convert_checkpoint(
            args.arch, args.input, args.output, num_classes=args.num_classes,
            output_stride=args.output_stride, seed=args.seed,
        )
    except (WeightLoadingError, ImportError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    config = summary["model_config"]
    print(f"loaded {len(summary['loaded'])} tensors from {args.input} into {config['arch']} "
          f"({config['num_classes']} classes); ignored {len(summary['dropped'])} "
          "(num_batches_tracked, ImageNet fc, stage aliases)")
    if summary["initialised"]:
        print(f"freshly initialised (not in the checkpoint): {', '.join(summary['initialised'])}")
    print(f"exported model written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
