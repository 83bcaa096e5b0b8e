"""Helpers of the parity tests: the torch reference networks with randomised BatchNorm, and the comparison of
our NNX models with them (weight conversion, stage outputs, error measures).

The networks themselves are the authors', transcribed once in ``benchmarks/authors_torch.py`` (built from the
official ``resnest`` 0.0.5 package), which the benchmarks time too.
"""

from __future__ import annotations

import numpy as np
import torch
from resnest.torch.resnet import ResNet

from benchmarks import authors_torch

torch.set_num_threads(2)

FLOAT64_TOLERANCE = 1e-9


def torch_resnet(blocks=(3, 4, 6, 3), output_stride: int = 16, seed: int = 0) -> ResNet:
    """``authors_torch.resnet`` (the geometry ``puzzle_jax.models.resnet`` documents) seeded, with randomised
    BatchNorm, in eval mode."""
    torch.manual_seed(seed)
    model = authors_torch.resnet(tuple(blocks), output_stride)
    randomize_batch_norm(model, seed)
    return model.eval()


def torch_resnest(arch: str, output_stride: int = 16, seed: int = 0) -> ResNet:
    """``authors_torch.resnest``: the official ResNeSt as the authors build it for the output stride, seeded, with
    randomised BatchNorm, in eval mode."""
    torch.manual_seed(seed)
    model = authors_torch.resnest(arch, output_stride)
    randomize_batch_norm(model, seed)
    return model.eval()


def torch_classifier(arch: str, num_classes: int, seed: int = 0) -> authors_torch.Classifier:
    """The authors' ``Classifier`` around a seeded backbone with randomised BatchNorm, in training mode.

    ``resnet_tiny`` is our ``resnet_tiny`` (one block per layer, base width 16: ``authors_torch.resnet`` with
    ``base_width=16``), not ``authors_torch``'s full-width one, so that converted weights fit it; the other
    architectures are ``authors_torch.create_backbone``'s at output stride 16.
    """
    torch.manual_seed(seed)
    if arch == "resnet_tiny":
        backbone = authors_torch.resnet(authors_torch.RESNET_BLOCKS["resnet_tiny"], 16, base_width=16)
    else:
        backbone = authors_torch.create_backbone(arch, 16)
    randomize_batch_norm(backbone, seed)
    return authors_torch.Classifier(backbone, num_classes).train()


def torch_variables(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A torch model's parameters and BN running statistics as float64 numpy, by state-dict key, without the
    authors' ``stage*`` aliases (the same tensors again) and ``num_batches_tracked``."""
    return {
        key: value.detach().numpy().astype(np.float64)
        for key, value in model.state_dict().items()
        if not key.startswith("stage") and not key.endswith("num_batches_tracked")
    }


_NNX_TO_TORCH_LEAF = {
    "kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"
}


def torch_key(path) -> str:
    """The torch state-dict key of an NNX variable from its pytree path (``jax.tree_util`` key entries):
    ``model/layer1/0/bn1/var`` -> ``model.layer1.0.bn1.running_var``. Written from the naming convention,
    independently of the converter."""
    keys = [str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))) for entry in path]
    keys = [key for key in keys if key not in ("value", "raw_value")]
    return ".".join(keys[:-1] + [_NNX_TO_TORCH_LEAF[keys[-1]]])


def nnx_variables_in_torch_layout(*trees) -> dict[str, np.ndarray]:
    """Pure NNX variable trees (e.g. a TrainState's ``params`` and ``batch_stats``) as ``torch_variables`` lays
    them out: keys by ``torch_key``, kernels transposed to OIHW, float64 numpy."""
    import jax

    variables = {}
    for tree in trees:
        for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
            array = np.asarray(value, np.float64)
            variables[torch_key(path)] = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array
    return variables


def nnx_tree_from_torch_layout(tree, variables: dict[str, np.ndarray]):
    """The inverse of ``nnx_variables_in_torch_layout`` for one tree: ``tree`` (pure NNX variables) with every
    leaf replaced by the value of its torch key in ``variables`` (OIHW kernels transposed back to HWIO), as numpy
    arrays of the leaf's dtype."""
    import jax

    def value(path, leaf):
        array = variables[torch_key(path)]
        return np.asarray(array.transpose(2, 3, 1, 0) if array.ndim == 4 else array, leaf.dtype)

    return jax.tree_util.tree_map_with_path(value, tree)


def torch_parameter_count(arch: str) -> int:
    """Parameters of the official network without its ImageNet ``fc``, counted on the meta device (no memory,
    no initialisation time)."""
    with torch.device("meta"):
        model = authors_torch.create_backbone(arch)
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("fc."))


def randomize_batch_norm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN parameters and running statistics, so that conversion mistakes show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                module.bias.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
                module.running_mean.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)


def torch_stages(model: ResNet, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """The five stage outputs of a torch ResNet/ResNeSt, as NHWC numpy arrays."""
    outputs = {}
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        outputs["stage1"] = x
        for index, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
            x = layer(x)
            outputs[f"stage{index + 2}"] = x
    return {name: value.permute(0, 2, 3, 1).numpy() for name, value in outputs.items()}


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12))


def l2_relative_error(actual, expected) -> float:
    """||actual - expected||_2 / ||expected||_2."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-12))


def random_images(batch: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


def converted_backbone(arch: str, reference, output_stride: int, dtype, bn_mode: str = "global", **options):
    """The NNX backbone with ``reference``'s weights, built abstractly (``nnx.eval_shape``) and then filled:
    no time is spent on a random initialisation that the weights replace. ``options``: more ``create_backbone``
    keywords (``bn_statistics``, ``grouped_conv``)."""
    from flax import nnx

    from puzzle_jax.models import create_backbone
    from puzzle_jax.weights import load_torch_weights

    model = nnx.eval_shape(
        lambda: create_backbone(
            arch, output_stride=output_stride, bn_mode=bn_mode, dtype=dtype, rngs=nnx.Rngs(0), **options
        )
    )
    load_torch_weights(model, reference.state_dict(), arch=arch)
    return model


def nnx_variable(model, torch_key: str) -> np.ndarray:
    """The NNX value that a torch state-dict key names, found by walking attributes (independent of the
    converter under test): ``layer1.0.bn1.running_mean`` -> ``model.layer1[0].bn1.mean``."""
    *parents, leaf = torch_key.split(".")
    node = model
    for part in parents:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    if hasattr(node, "kernel"):
        return np.asarray({"weight": node.kernel, "bias": node.bias}[leaf][...])
    names = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
    return np.asarray(getattr(node, names[leaf])[...])


def _forward(model, images):
    """One eager forward pass. Eager beats ``nnx.jit`` over the whole test session: its per-operation
    compilations are cached by shape and dtype, and the parity tests share most shapes (ResNeSt-101 repeats
    ResNeSt-50's blocks), whereas every jitted network compiles from scratch."""
    import jax.numpy as jnp

    return model(jnp.asarray(images))


def _batch_statistics(state: dict, running_before: dict) -> dict:
    """Per BN key, the batch statistic recovered from one running update: (new - 0.9 * old) / 0.1."""
    return {key: (np.asarray(state[key], np.float64) - 0.9 * old) / 0.1 for key, old in running_before.items()}


def assert_backbone_parity(
    create_model,
    reference,
    images: np.ndarray,
    *,
    tolerance: float = 1e-4,
    train_float32: bool = True,
    float64: bool = True,
    float64_size: int = 32,
) -> dict:
    """Parity of an NNX backbone with a torch one, in eval and in train mode.

    Args:
      create_model: ``create_model(dtype)`` returns the NNX backbone (``bn_mode="global"``) holding
        ``reference``'s converted weights and computing in ``dtype`` (see ``converted_backbone``).
      reference: the torch backbone, in eval mode.
      images: NHWC float32 batch.
      tolerance: bound of the float32 eval check.
      train_float32: run check 2.
      float64: run check 3.
      float64_size: the train-mode checks (2 and 3) use the top-left crop of this size (float64
        convolutions are slow on CPU, and neither check depends on the size).

    Checks:
      1. float32, eval mode: max |a - b| / max |b| < tolerance for every stage output.
      2. float32, train mode (one forward, on the crop): as accurate as torch's own float32, measured
         against torch in float64: for every stage, ||ours - torch64|| <= 2 ||torch32 - torch64|| + 1e-6
         (L2 norms). A fixed bound cannot work here: train-mode BN divides by batch standard deviations of
         random-weight activations, and split attention's BN normalises (B, C, 1, 1) maps, i.e. statistics
         over B values, so float32 rounding is amplified with depth. With batch 2, torch's own float32
         ResNeSt-50 is ~7e-3 (L2) away from its float64 result at stage5.
      3. float64 (``jax.enable_x64``, float64 running statistics), one train-mode forward on the crop: stage
         outputs and every BN layer's batch mean and variance within ``FLOAT64_TOLERANCE``, the statistics
         recovered from the running update as (new - 0.9 * old) / 0.1. This is the exact check of the
         semantics (padding, pooling, dilation, split attention, biased/unbiased variance, momentum, reduced
         axes): with a batch of 4 the errors are ~1e-13 (ResNet-50) to ~1e-11 (ResNeSt-101), while a
         semantic slip such as a biased running variance gives >= 1e-3. (With a batch of 2, split
         attention's BN over (B, C, 1, 1) maps, i.e. over 2 values, amplifies even float64 rounding to
         ~1e-10.)

    Returns:
      The worst error of each check, for reporting.
    """
    import copy

    import jax
    import jax.numpy as jnp
    from flax import nnx

    errors = {}
    model = create_model(jnp.float32)
    model.eval()
    outputs = _forward(model, images)
    expected = torch_stages(reference, images)
    errors["eval_float32_max"] = max(relative_error(outputs[name], expected[name]) for name in expected)
    for name in expected:
        assert relative_error(outputs[name], expected[name]) < tolerance, ("eval float32", name)

    if not (train_float32 or float64):
        return errors
    # Train mode, on a crop (float64 convolutions are slow on CPU, and neither check depends on the size).
    # Train-mode forwards run on copies: they update the running statistics.
    crop = images[:, :float64_size, :float64_size]
    reference64 = copy.deepcopy(reference).double()
    running_before = {
        key: value.numpy().copy() for key, value in reference64.state_dict().items() if "running_" in key
    }
    truth = torch_stages(reference64.train(), crop.astype(np.float64))
    torch_batch = _batch_statistics(reference64.state_dict(), running_before)

    if train_float32:
        expected = torch_stages(copy.deepcopy(reference).train(), crop)
        model.train()
        outputs = _forward(model, crop)
        ours = {name: l2_relative_error(outputs[name], truth[name]) for name in truth}
        torchs = {name: l2_relative_error(expected[name], truth[name]) for name in truth}
        errors["train_float32_l2_vs_float64"] = max(ours.values())
        errors["torch_train_float32_l2_vs_float64"] = max(torchs.values())
        errors["train_float32_l2_vs_torch"] = max(
            l2_relative_error(outputs[name], expected[name]) for name in expected
        )
        for name in truth:
            assert ours[name] <= 2 * torchs[name] + 1e-6, ("train float32", name, ours[name], torchs[name])

    if not float64:
        return errors
    with jax.enable_x64(True):
        model64 = create_model(jnp.float64)
        # float64 running statistics too (they are float32 by default), so the recovered batch statistics
        # are exact.
        stats = nnx.state(model64, nnx.BatchStat)
        nnx.update(model64, jax.tree.map(lambda value: jnp.asarray(value, jnp.float64), stats))
        model64.train()
        outputs = _forward(model64, crop.astype(np.float64))
        assert outputs["stage5"].dtype == jnp.float64
        errors["train_float64_max"] = max(relative_error(outputs[name], truth[name]) for name in truth)
        for name in truth:
            assert relative_error(outputs[name], truth[name]) < FLOAT64_TOLERANCE, ("train float64", name)
        ours = {key: nnx_variable(model64, key) for key in running_before}
    ours_batch = _batch_statistics(ours, running_before)
    errors["batch_stats_float64_max"] = max(
        relative_error(ours_batch[key], torch_batch[key]) for key in running_before
    )
    for key in running_before:
        error = relative_error(ours_batch[key], torch_batch[key])
        assert error < FLOAT64_TOLERANCE, ("batch statistics", key, error)
    return errors
