"""Tests for puzzle_jax.models.resnet and the create_backbone API."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch_reference import (
    assert_backbone_parity,
    converted_backbone,
    random_images,
    randomize_batch_norm,
    relative_error,
    torch_resnet,
)

from benchmarks import authors_torch
from puzzle_jax.models import ARCHITECTURES, create_backbone, layers

STAGES = ("stage1", "stage2", "stage3", "stage4", "stage5")


@pytest.mark.slow
@pytest.mark.parametrize("output_stride", [16, 8, 32])
def test_resnet50_matches_torch_reference(output_stride):
    """Converted weights: stage outputs (eval and train mode) and BN batch statistics within 1e-4 relative
    error of the torch network (see torch_reference.assert_backbone_parity for the error measures)."""
    reference = torch_resnet((3, 4, 6, 3), output_stride)
    size = 128 if output_stride == 32 else 64  # stage5 at least 4x4
    images = random_images(batch=4, size=size)

    def create_model(dtype):
        return converted_backbone("resnet50", reference, output_stride, dtype)

    model = create_model(jnp.float32)
    shapes = nnx.eval_shape(lambda module, batch: module(batch), model, jnp.asarray(images))
    strides = {"stage1": 4, "stage2": 4, "stage3": 8, "stage4": min(16, output_stride), "stage5": output_stride}
    for name in STAGES:
        assert shapes[name].shape[1:3] == (size // strides[name],) * 2, name

    # OS32 differs from OS16 only in geometry, which the (well-conditioned) eval check covers.
    errors = assert_backbone_parity(
        create_model,
        reference,
        images,
        train_float32=output_stride == 16,
        float64=output_stride != 32,
    )
    print(f"resnet50 OS{output_stride} relative errors: {errors}")


@pytest.mark.parametrize("output_stride", [16, 8, 32])
def test_resnet_small_matches_torch_reference(output_stride):
    """``resnet_small`` is the torch ResNet with two Bottleneck blocks per layer at base width 16
    (``authors_torch.resnet((2, 2, 2, 2), base_width=16)``): converted weights give its stage outputs (eval and
    train mode) and BN batch statistics, as for ResNet-50. Two blocks per layer exercise what ``resnet_tiny``
    cannot: blocks without a projection shortcut, and at OS8 the dilation of the blocks after a layer's first."""
    torch.manual_seed(output_stride)
    reference = authors_torch.resnet((2, 2, 2, 2), output_stride, base_width=16)
    randomize_batch_norm(reference, output_stride)
    reference.eval()
    size = 64 if output_stride == 32 else 48  # stage5 at least 2x2 (3x3 at OS16, 6x6 at OS8)
    images = random_images(batch=4, size=size, seed=output_stride)

    def create_model(dtype):
        return converted_backbone("resnet_small", reference, output_stride, dtype)

    model = create_model(jnp.float32)
    assert [len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == [2, 2, 2, 2]
    assert [block.downsample is None for layer in (model.layer1, model.layer4) for block in layer] == [
        False, True, False, True
    ]
    assert model.stage_features == (16, 64, 128, 256, 512)
    errors = assert_backbone_parity(create_model, reference, images, float64_size=32)
    print(f"resnet_small OS{output_stride} relative errors: {errors}")


def test_resnet_small_parameter_count():
    """Twice resnet_tiny's blocks at the same widths; the count is the torch network's without its ``fc``."""
    model = nnx.eval_shape(lambda: create_backbone("resnet_small", rngs=nnx.Rngs(0)))
    count = sum(np.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    reference = authors_torch.resnet((2, 2, 2, 2), 16, base_width=16)
    assert count == sum(p.numel() for name, p in reference.named_parameters() if not name.startswith("fc."))
    tiny = nnx.eval_shape(lambda: create_backbone("resnet_tiny", rngs=nnx.Rngs(0)))
    assert count > sum(np.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(tiny, nnx.Param)))


@pytest.mark.parametrize("output_stride,final_size", [(8, 8), (16, 4), (32, 2)])
def test_resnet_tiny_shapes(output_stride, final_size):
    model = create_backbone("resnet_tiny", output_stride=output_stride, rngs=nnx.Rngs(0))
    outputs = model(jnp.zeros((2, 64, 64, 3)))
    assert model.stage_features == (16, 64, 128, 256, 512)
    assert model.out_features == 512
    for name, channels in zip(STAGES, model.stage_features):
        assert outputs[name].shape[-1] == channels
    assert outputs["stage5"].shape == (2, final_size, final_size, 512)
    assert outputs["stage1"].shape == (2, 16, 16, 16)


def test_resnet101_block_counts():
    model = nnx.eval_shape(lambda: create_backbone("resnet101", rngs=nnx.Rngs(0)))
    assert [len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == [3, 4, 23, 3]
    params = nnx.state(model, nnx.Param)
    assert sum(np.prod(v.shape) for _, v in nnx.to_flat_state(params)) == 42_500_160  # torchvision, no fc


def test_model_holds_only_params_and_batch_stats():
    model = create_backbone("resnet_tiny", bn_mode="global", rngs=nnx.Rngs(0))
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    kinds = {type(v) for _, v in nnx.to_flat_state(nnx.state(model))}
    assert kinds == {nnx.Param, nnx.BatchStat}
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert {"conv1/kernel", "bn1/scale", "layer1/0/downsample/0/kernel", "layer4/0/conv2/kernel"} <= paths
    assert {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(batch_stats)} >= {"bn1/mean", "bn1/var"}


@pytest.mark.parametrize("bn_mode,changes", [("global", True), ("per_replica", True), ("frozen", False)])
def test_training_forward_updates_batch_statistics(bn_mode, changes):
    model = create_backbone(
        "resnet_tiny", bn_mode=bn_mode, bn_group_size=2 if bn_mode == "per_replica" else None,
        rngs=nnx.Rngs(0),
    )
    before = np.asarray(model.layer2[0].bn2.mean[...])
    model(jnp.asarray(random_images(batch=4, size=32)))
    assert changes == (not np.allclose(model.layer2[0].bn2.mean[...], before))
    model.eval()
    after_training = np.asarray(model.layer2[0].bn2.mean[...])
    model(jnp.asarray(random_images(batch=4, size=32)))
    np.testing.assert_array_equal(model.layer2[0].bn2.mean[...], after_training)


def _loss_and_grads_fn(model):
    """The training step's pattern (README, "Architecture"): pure arrays across jit, merge inside value_and_grad."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = nnx.as_pure(params), nnx.as_pure(batch_stats)

    def step(params, batch_stats, images):
        def loss_fn(params):
            module = nnx.merge(graphdef, params, batch_stats)
            outputs = module(images)
            loss = jnp.mean((outputs["stage5"] if isinstance(outputs, dict) else outputs) ** 2)
            return loss, nnx.as_pure(nnx.state(module, nnx.BatchStat))

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, new_stats

    return step, params, batch_stats


def _count_checkpoints(jaxpr) -> int:
    count = 0
    for equation in jaxpr.eqns:
        count += equation.primitive.name.startswith("remat") or equation.primitive.name == "checkpoint"
        for sub in jax.extend.core.jaxprs_in_params(equation.params):
            count += _count_checkpoints(sub)
    return count


@pytest.mark.parametrize("remat,expected", [(False, 0), (True, 4)])
def test_remat_checkpoints_every_block(remat, expected):
    """Traced only: each of resnet_tiny's four blocks runs under jax.checkpoint when remat is on."""
    model = create_backbone("resnet_tiny", bn_mode="global", remat=remat, rngs=nnx.Rngs(0))
    step, params, batch_stats = _loss_and_grads_fn(model)
    jaxpr = jax.make_jaxpr(step)(params, batch_stats, jnp.zeros((2, 32, 32, 3)))
    assert _count_checkpoints(jaxpr.jaxpr) == expected


def test_remat_gives_the_same_loss_gradients_and_statistics():
    """Numerically, on one block (cheap to compile): rematerialisation changes nothing."""
    images = jnp.asarray(random_images(batch=4, size=8)[..., :1].repeat(64, axis=-1))
    results = []
    for remat in (False, True):
        block = create_backbone("resnet_tiny", bn_mode="global", rngs=nnx.Rngs(0)).layer2[0]

        class Wrapper(nnx.Module):
            def __init__(self, block, remat):
                self.block, self.remat = block, remat

            def __call__(self, x):
                return layers.call_block(self.block, x, self.remat)

        step, params, batch_stats = _loss_and_grads_fn(Wrapper(block, remat))
        results.append(jax.jit(step)(params, batch_stats, images))
    (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = results
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(jax.tree.leaves(stats_a), jax.tree.leaves(stats_b)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads_a))


def test_bfloat16_compute_keeps_float32_parameters():
    images = jnp.asarray(random_images(batch=4, size=32))
    full = create_backbone("resnet_tiny", rngs=nnx.Rngs(0))
    half = create_backbone("resnet_tiny", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    outputs = half(images)
    assert all(outputs[name].dtype == jnp.bfloat16 for name in STAGES)
    assert {v.dtype for _, v in nnx.to_flat_state(nnx.state(half))} == {jnp.dtype(jnp.float32)}
    assert relative_error(outputs["stage5"].astype(jnp.float32), full(images)["stage5"]) < 0.1


def test_creation_is_deterministic_and_seeded():
    a = create_backbone("resnet_tiny", rngs=nnx.Rngs(0))
    b = create_backbone("resnet_tiny", rngs=nnx.Rngs(0))
    c = create_backbone("resnet_tiny", rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(a.layer3[0].conv2.kernel[...], b.layer3[0].conv2.kernel[...])
    assert not np.allclose(a.layer3[0].conv2.kernel[...], c.layer3[0].conv2.kernel[...])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(arch="resnet18"), "arch"),
        (dict(arch="resnet_tiny", output_stride=4), "output_stride"),
        (dict(arch="resnet_tiny", bn_mode="sync"), "bn_mode"),
        (dict(arch="resnet_tiny", bn_mode="per_replica"), "bn_group_size"),
    ],
)
def test_create_backbone_rejects_unknown_values(kwargs, field):
    with pytest.raises(ValueError, match=field) as error:
        create_backbone(rngs=nnx.Rngs(0), **kwargs)
    if field == "arch":
        assert all(name in str(error.value) for name in ARCHITECTURES)
