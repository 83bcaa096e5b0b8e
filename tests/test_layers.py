"""Tests for puzzle_jax.models.layers: BatchNorm modes, convolution, pooling and the aligned-corner bilinear resize
with torch semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from puzzle_jax.models import layers

EPS = 1e-5


def _inputs(shape, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.randn(*shape) * 2.0 + 0.5).astype(np.float32)


def _bn_with_random_affine(channels, seed=1, **kwargs):
    bn = layers.BatchNorm(channels, **kwargs)
    rng = np.random.RandomState(seed)
    bn.scale.set_value(jnp.asarray(rng.rand(channels).astype(np.float32) + 0.5))
    bn.bias.set_value(jnp.asarray(rng.randn(channels).astype(np.float32)))
    bn.mean.set_value(jnp.asarray(rng.randn(channels).astype(np.float32) * 0.1))
    bn.var.set_value(jnp.asarray(rng.rand(channels).astype(np.float32) + 0.5))
    return bn


def _reference_normalize(x, mean, var, scale, bias):
    return (x - mean) / np.sqrt(var + EPS) * scale + bias


# ----------------------------------------------------------------------------------------------- BatchNorm


def test_batch_norm_global_train_matches_closed_form():
    x = _inputs((4, 5, 6, 3))
    bn = _bn_with_random_affine(3, mode="global")
    scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
    old_mean, old_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])

    out = np.asarray(bn(jnp.asarray(x)))

    mean = x.mean(axis=(0, 1, 2))
    biased_var = x.var(axis=(0, 1, 2))
    unbiased_var = x.var(axis=(0, 1, 2), ddof=1)
    np.testing.assert_allclose(out, _reference_normalize(x, mean, biased_var, scale, bias), atol=1e-5)
    np.testing.assert_allclose(bn.mean[...], 0.9 * old_mean + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], 0.9 * old_var + 0.1 * unbiased_var, rtol=1e-5)


def test_batch_norm_per_replica_uses_group_statistics():
    x = _inputs((6, 3, 4, 2), seed=3)
    x[2:4] += 5.0  # groups must really differ
    bn = _bn_with_random_affine(2, mode="per_replica", group_size=2)
    scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
    old_mean, old_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])

    out = np.asarray(bn(jnp.asarray(x)))

    groups = x.reshape(3, 2, 3, 4, 2)
    means = groups.mean(axis=(1, 2, 3))
    biased = groups.var(axis=(1, 2, 3))
    unbiased = groups.var(axis=(1, 2, 3), ddof=1)
    expected = np.concatenate(
        [_reference_normalize(groups[g], means[g], biased[g], scale, bias) for g in range(3)]
    )
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(bn.mean[...], 0.9 * old_mean + 0.1 * means.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], 0.9 * old_var + 0.1 * unbiased.mean(0), rtol=1e-5)


def test_batch_norm_per_replica_with_whole_batch_equals_global():
    x = jnp.asarray(_inputs((4, 3, 3, 5)))
    per_replica = _bn_with_random_affine(5, mode="per_replica", group_size=4)
    global_bn = _bn_with_random_affine(5, mode="global")
    np.testing.assert_allclose(per_replica(x), global_bn(x), atol=1e-6)
    np.testing.assert_allclose(per_replica.var[...], global_bn.var[...], rtol=1e-6)


def test_batch_norm_frozen_uses_running_statistics_and_trains_affine():
    x = _inputs((2, 3, 3, 4))
    bn = _bn_with_random_affine(4, mode="frozen")
    mean, var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
    scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
    bn.train()

    out = np.asarray(bn(jnp.asarray(x)))

    np.testing.assert_allclose(out, _reference_normalize(x, mean, var, scale, bias), atol=1e-5)
    np.testing.assert_array_equal(bn.mean[...], mean)
    np.testing.assert_array_equal(bn.var[...], var)

    graphdef, params, batch_stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, batch_stats)(jnp.asarray(x)) ** 2)

    grads = jax.grad(loss)(params)
    assert float(jnp.abs(grads["scale"][...]).sum()) > 0
    assert float(jnp.abs(grads["bias"][...]).sum()) > 0


def test_batch_norm_train_eval_switching():
    x = jnp.asarray(_inputs((2, 3, 3, 4)))
    bn = _bn_with_random_affine(4, mode="global")
    mean, var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
    expected_eval = _reference_normalize(
        np.asarray(x), mean, var, np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
    )

    bn.eval()
    assert bn.use_running_average
    np.testing.assert_allclose(bn(x), expected_eval, atol=1e-5)
    np.testing.assert_array_equal(bn.mean[...], mean)

    evaluated = nnx.view(bn, use_running_average=True)
    bn.train()
    assert not bn.use_running_average and evaluated.use_running_average
    np.testing.assert_allclose(evaluated(x), expected_eval, atol=1e-5)
    bn(x)
    assert not np.allclose(bn.mean[...], mean)


def test_batch_norm_matches_torch_in_training():
    x = _inputs((4, 6, 5, 3), seed=7)
    torch_bn = torch.nn.BatchNorm2d(3).train()
    bn = layers.BatchNorm(3, mode="global")
    for step in range(2):
        batch = x + step
        expected = torch_bn(torch.from_numpy(batch.transpose(0, 3, 1, 2))).detach().numpy()
        np.testing.assert_allclose(bn(jnp.asarray(batch)), expected.transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(bn.mean[...], torch_bn.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], torch_bn.running_var.numpy(), rtol=1e-5)


def test_batch_norm_reduced_precision_keeps_float32_state():
    bn = layers.BatchNorm(3, mode="global", dtype=jnp.bfloat16)
    out = bn(jnp.asarray(_inputs((2, 4, 4, 3))).astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert bn.mean[...].dtype == jnp.float32 and bn.scale[...].dtype == jnp.float32


def test_batch_norm_rejects_bad_configuration():
    with pytest.raises(ValueError, match="bn_mode"):
        layers.BatchNorm(3, mode="sync")
    with pytest.raises(ValueError, match="bn_group_size"):
        layers.BatchNorm(3, mode="per_replica")
    bn = layers.BatchNorm(3, mode="per_replica", group_size=4)
    with pytest.raises(ValueError, match="multiple of bn_group_size"):
        bn(jnp.zeros((6, 2, 2, 3)))


@pytest.mark.parametrize("mode", ["global", "per_replica"])
def test_batch_norm_sharded_batch_matches_single_device(mode):
    """Under jit with the batch split over 8 devices, statistics are still those of the mode's groups."""
    devices = jax.devices()
    assert len(devices) == 8, "conftest.py should give 8 CPU devices"
    mesh = jax.make_mesh((8,), ("data",))
    x = _inputs((16, 3, 3, 4), seed=11)
    x[8:] += 3.0
    kwargs = dict(mode=mode, group_size=2 if mode == "per_replica" else None)
    reference = _bn_with_random_affine(4, **kwargs)
    expected = reference(jnp.asarray(x))

    bn = _bn_with_random_affine(4, **kwargs)
    graphdef, state = nnx.split(bn)

    @jax.jit
    def step(state, batch):
        module = nnx.merge(graphdef, state)
        return module(batch), nnx.state(module)

    batch = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data")))
    out, new_state = step(state, batch)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(new_state["mean"][...], reference.mean[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state["var"][...], reference.var[...], rtol=1e-5)


@pytest.mark.parametrize("mode", ["global", "per_replica"])
def test_one_pass_statistics_equal_two_pass_ones_and_their_gradients(mode):
    """Float64: the same outputs, running statistics and input/parameter gradients to rounding (1e-12); a shifted
    one-pass variance that dropped the shift's correction, or a gradient through the shift, would be off by O(1)."""
    x = _inputs((4, 5, 6, 3)) + 3.0
    weights = np.random.RandomState(7).randn(*x.shape)
    results = {}
    with jax.enable_x64(True):
        for statistics in ("two_pass", "one_pass"):
            bn = _bn_with_random_affine(3, mode=mode, group_size=2, statistics=statistics)
            stats = nnx.state(bn, nnx.BatchStat)
            nnx.update(bn, jax.tree.map(lambda value: jnp.asarray(value, jnp.float64), stats))

            def loss(module, inputs):
                return jnp.sum(module(inputs) * weights)

            value, (grad_bn, grad_x) = nnx.value_and_grad(loss, argnums=(0, 1))(bn, jnp.asarray(x, jnp.float64))
            results[statistics] = (
                value, grad_x, grad_bn["scale"][...], grad_bn["bias"][...], bn.mean[...], bn.var[...]
            )
    for two_pass, one_pass in zip(results["two_pass"], results["one_pass"], strict=True):
        np.testing.assert_allclose(one_pass, two_pass, rtol=1e-12, atol=1e-12)


def _activation_reductions(closed_jaxpr, size: int) -> int:
    """Reductions of an activation-sized operand over more than a size-1 axis, in the jaxpr and its sub-jaxprs."""
    count = 0
    for eqn in closed_jaxpr.jaxpr.eqns:
        operand = eqn.invars[0].aval if eqn.invars else None
        if eqn.primitive.name == "reduce_sum" and operand.size >= size:
            count += any(operand.shape[axis] > 1 for axis in eqn.params["axes"])
        for param in eqn.params.values():
            if isinstance(param, jax.extend.core.ClosedJaxpr):
                count += _activation_reductions(param, size)
    return count


def test_one_pass_backward_reads_the_activation_for_two_sibling_reductions_only():
    """The point of ``one_pass``: forward 2 reductions (siblings, one read), backward 2 (sum dy, sum dy x_hat);
    automatic differentiation of the two-pass form has 4 in its backward."""
    x = jnp.asarray(_inputs((4, 6, 6, 8)))
    counts = {}
    for statistics in ("two_pass", "one_pass"):
        graphdef, state = nnx.split(layers.BatchNorm(8, statistics=statistics))
        state = nnx.as_pure(state)

        def loss(state, inputs, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, state)(inputs) * jnp.arange(8.0))

        forward = _activation_reductions(jax.make_jaxpr(loss)(state, x), x.size)
        both = _activation_reductions(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(state, x), x.size)
        counts[statistics] = (forward - 1, both - forward)  # without the loss's own sum
    assert counts == {"two_pass": (2, 4), "one_pass": (2, 2)}


def test_one_pass_in_bfloat16_keeps_the_activation_dtype_and_the_gradient():
    x = jnp.asarray(_inputs((4, 5, 6, 3)), jnp.bfloat16)
    weights = jnp.asarray(np.random.RandomState(2).randn(4, 5, 6, 3), jnp.float32)
    gradients = {}
    for statistics in ("two_pass", "one_pass"):
        bn = _bn_with_random_affine(3, statistics=statistics, dtype=jnp.bfloat16)

        def loss(module, inputs):
            out = module(inputs)
            assert out.dtype == jnp.bfloat16
            return jnp.sum(out.astype(jnp.float32) * weights)

        gradients[statistics] = nnx.grad(loss, argnums=(0, 1))(bn, x)
    (module_one, input_one), (module_two, input_two) = gradients["one_pass"], gradients["two_pass"]
    assert input_one.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(input_one, np.float32), np.asarray(input_two, np.float32), atol=0.05)
    np.testing.assert_allclose(module_one["scale"][...], module_two["scale"][...], rtol=1e-5, atol=1e-4)


def test_one_pass_variance_stays_accurate_far_from_zero_mean():
    """Float32, mean 1000 and std 1: the shifted sums keep the variance to 1e-4 where the unshifted
    E[x^2] - E[x]^2 (the control below) is off by more than 1%."""
    x = (np.random.RandomState(3).randn(8, 16, 16, 4) + 1000.0).astype(np.float32)
    truth = x.astype(np.float64).var(axis=(0, 1, 2)) * (x[..., 0].size / (x[..., 0].size - 1))
    bn = layers.BatchNorm(4, momentum=1.0, statistics="one_pass")
    out = bn(jnp.asarray(x))
    np.testing.assert_allclose(bn.var[...], truth, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out).std(axis=(0, 1, 2)), 1.0, rtol=1e-3)
    axes = (0, 1, 2)
    unshifted = jnp.mean(jnp.square(jnp.asarray(x)), axis=axes) - jnp.square(jnp.mean(jnp.asarray(x), axis=axes))
    assert np.max(np.abs(np.asarray(unshifted) / truth - 1)) > 1e-2


@pytest.mark.parametrize("statistics", ["two_pass", "one_pass"])
@pytest.mark.parametrize(
    "mode,training", [("global", True), ("per_replica", True), ("global", False), ("frozen", True)]
)
def test_channel_parts_equal_one_call_on_their_concatenation(statistics, mode, training):
    x = _inputs((4, 5, 6, 7))
    whole = _bn_with_random_affine(7, mode=mode, group_size=2, statistics=statistics, use_running_average=not training)
    parted = _bn_with_random_affine(7, mode=mode, group_size=2, statistics=statistics, use_running_average=not training)
    expected = whole(jnp.asarray(x))
    outputs = parted.call_channel_parts([jnp.asarray(x[..., :3]), jnp.asarray(x[..., 3:])])
    assert [output.shape[-1] for output in outputs] == [3, 4]
    np.testing.assert_allclose(np.concatenate(outputs, axis=-1), expected, atol=1e-6)
    np.testing.assert_allclose(parted.mean[...], whole.mean[...], atol=1e-7)
    np.testing.assert_allclose(parted.var[...], whole.var[...], rtol=1e-6)
    with pytest.raises(ValueError, match="BatchNorm of 7 channels got parts of \\[3, 3\\] channels"):
        parted.call_channel_parts([jnp.asarray(x[..., :3]), jnp.asarray(x[..., 3:6])])


# ------------------------------------------------------------------------------------------- convolution


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, padding=2, dilation=2, groups=2, use_bias=True),
        dict(kernel_size=7, stride=2, padding=3),
        dict(kernel_size=1, stride=2),
    ],
)
def test_conv_matches_torch(kwargs):
    x = _inputs((2, 9, 11, 4))
    conv = layers.Conv2d(4, 6, rngs=nnx.Rngs(0), **kwargs)
    if conv.bias is not None:
        conv.bias.set_value(jnp.arange(6, dtype=jnp.float32))
    weight = torch.from_numpy(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1).copy())
    bias = None if conv.bias is None else torch.from_numpy(np.array(conv.bias[...]))
    expected = F.conv2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)),
        weight,
        bias,
        stride=kwargs.get("stride", 1),
        padding=kwargs.get("padding", 0),
        dilation=kwargs.get("dilation", 1),
        groups=kwargs.get("groups", 1),
    ).numpy()
    np.testing.assert_allclose(conv(jnp.asarray(x)), expected.transpose(0, 2, 3, 1), atol=1e-4)


@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_conv_programs_compute_the_grouped_conv_and_its_gradient(groups):
    """Float64: per-group convolutions and the block-diagonal dense one equal ``feature_group_count``, values and
    kernel/bias/input gradients; the block-diagonal kernel's zero blocks are not parameters."""
    rng = np.random.RandomState(0)
    x = rng.randn(2, 9, 11, 6)
    weights = rng.randn(2, 9, 11, 12)
    with jax.enable_x64(True):
        conv = layers.Conv2d(6, 12, 3, padding=2, dilation=2, groups=groups, use_bias=True, rngs=nnx.Rngs(0),
                             dtype=jnp.float64)
        conv.kernel.set_value(jnp.asarray(conv.kernel[...], jnp.float64))
        conv.bias.set_value(jnp.asarray(rng.randn(12)))
        group_in = 6 // groups

        def programs(module, inputs):
            parts = [inputs[..., g * group_in : (g + 1) * group_in] for g in range(groups)]
            return {
                "grouped": module(inputs),
                "block_diagonal": module.call_block_diagonal(inputs),
                "split": jnp.concatenate(module.call_groups(parts), axis=-1),
            }

        outputs = programs(conv, jnp.asarray(x))
        gradients = {
            name: nnx.grad(lambda module, inputs, name=name: jnp.sum(programs(module, inputs)[name] * weights),
                           argnums=(0, 1))(conv, jnp.asarray(x))
            for name in outputs
        }
    for name in ("block_diagonal", "split"):
        np.testing.assert_allclose(outputs[name], outputs["grouped"], rtol=1e-12, atol=1e-12)
        (module_grad, input_grad), (reference_module, reference_input) = gradients[name], gradients["grouped"]
        assert module_grad["kernel"][...].shape == (3, 3, group_in, 12)
        pairs = (
            (module_grad["kernel"][...], reference_module["kernel"][...]),
            (module_grad["bias"][...], reference_module["bias"][...]),
            (input_grad, reference_input),
        )
        for ours, reference in pairs:
            np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=f"call_groups needs {groups} inputs, got 1"):
        conv.call_groups([jnp.asarray(x)])


@pytest.mark.parametrize("mode,fan", [("fan_out", 3 * 3 * 256), ("fan_in", 3 * 3 * 128)])
def test_conv_kaiming_initialisation(mode, fan):
    for rngs in (nnx.Rngs(0), layers.KernelInitializer(nnx.Rngs(0))):
        conv = layers.Conv2d(128, 256, 3, init_mode=mode, rngs=rngs)
        if isinstance(rngs, layers.KernelInitializer):
            rngs.finalize()
        kernel = np.asarray(conv.kernel[...])
        assert kernel.shape == (3, 3, 128, 256)
        assert abs(kernel.std() / np.sqrt(2.0 / fan) - 1) < 0.02
        assert abs(kernel.mean()) < 0.01 * kernel.std()


def test_kernel_initializer_gives_the_same_values_under_jit():
    def create():
        kernels = layers.KernelInitializer(nnx.Rngs(3))
        convs = nnx.List([layers.Conv2d(8, 16, 3, rngs=kernels), layers.Conv2d(16, 4, 1, rngs=kernels)])
        kernels.finalize()
        return convs

    eager = create()
    jitted = nnx.jit(create)()
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(a.kernel[...], b.kernel[...])
    assert not np.allclose(eager[0].kernel[...][..., :4].ravel()[:36], eager[1].kernel[...].ravel()[:36])


# --------------------------------------------------------------------------------------------- pooling


def _torch_nhwc(function, x, **kwargs):
    out = function(torch.from_numpy(x.transpose(0, 3, 1, 2)), **kwargs).numpy()
    return out.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", [(7, 9), (8, 8), (5, 6)])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
        dict(kernel_size=2, stride=2, padding=0, ceil_mode=True),
        dict(kernel_size=3, stride=1, padding=1),
    ],
)
def test_max_pool_matches_torch(size, kwargs):
    x = _inputs((2, *size, 3)) - 3.0  # mostly negative: zero padding would win the max
    expected = _torch_nhwc(F.max_pool2d, x, **kwargs)
    np.testing.assert_array_equal(layers.max_pool2d(jnp.asarray(x), **kwargs), expected)
    np.testing.assert_array_equal(layers.MaxPool2d(**kwargs)(jnp.asarray(x)), expected)


@pytest.mark.parametrize("size", [(7, 9), (8, 8), (5, 6)])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=2, stride=2, ceil_mode=True, count_include_pad=False),  # avg_down
        dict(kernel_size=3, stride=1, padding=1),  # avd, stride 1
        dict(kernel_size=3, stride=2, padding=1),  # avd, stride 2
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=True),
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        dict(kernel_size=1, stride=1, ceil_mode=True, count_include_pad=False),
    ],
)
def test_avg_pool_matches_torch(size, kwargs):
    x = _inputs((2, *size, 3))
    expected = _torch_nhwc(F.avg_pool2d, x, **kwargs)
    np.testing.assert_allclose(layers.avg_pool2d(jnp.asarray(x), **kwargs), expected, atol=1e-6)
    np.testing.assert_allclose(layers.AvgPool2d(**kwargs)(jnp.asarray(x)), expected, atol=1e-6)


@pytest.mark.parametrize(
    "function,torch_function,kwargs",
    [
        (layers.max_pool2d, F.max_pool2d, dict(kernel_size=3, stride=2, padding=1)),
        (layers.avg_pool2d, F.avg_pool2d, dict(kernel_size=2, stride=2, ceil_mode=True, count_include_pad=False)),
        (layers.avg_pool2d, F.avg_pool2d, dict(kernel_size=3, stride=1, padding=1)),
    ],
)
def test_pool_gradients_under_jit_match_torch(function, torch_function, kwargs):
    """Differentiable under jit (a traced init value would make reduce_window's generic form, which has no
    gradient), with torch's gradients."""
    x = _inputs((2, 7, 9, 3))
    weights = _inputs((2, 7, 9, 3), seed=5)

    def loss(images):
        out = function(images, **kwargs)
        return jnp.sum(out * jnp.asarray(weights[:, : out.shape[1], : out.shape[2]]))

    grads = jax.jit(jax.grad(loss))(jnp.asarray(x))

    images = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    out = torch_function(images, **kwargs)
    torch_weights = torch.from_numpy(weights.transpose(0, 3, 1, 2)[:, :, : out.shape[2], : out.shape[3]].copy())
    (out * torch_weights).sum().backward()
    np.testing.assert_allclose(grads, images.grad.numpy().transpose(0, 2, 3, 1), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# resize_bilinear_align_corners
# --------------------------------------------------------------------------------------------------


def _relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


RESIZES = [
    ((5, 7), (9, 13)),  # up, odd sizes
    ((9, 13), (4, 6)),  # down
    ((6, 3), (2, 8)),  # down one axis, up the other
    ((17, 21), (68, 84)),  # the decoder's final x4 upsample of a non-multiple-of-16 input
    ((1, 1), (3, 4)),  # the image-pooling branch: input side 1
    ((4, 5), (1, 1)),  # output side 1: torch samples the first pixel
    ((3, 1), (1, 2)),
    ((4, 5), (4, 5)),  # identity
]


def _torch_resize(x_nhwc, size):
    nchw = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    return F.interpolate(nchw, size=size, mode="bilinear", align_corners=True).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("source, target", RESIZES)
def test_resize_matches_torch_align_corners(source, target):
    x = np.random.RandomState(6).randn(2, *source, 3)
    with jax.enable_x64(True):
        ours = layers.resize_bilinear_align_corners(jnp.asarray(x), target)
        assert ours.dtype == jnp.float64
        assert _relative_error(ours, _torch_resize(x, target)) < 1e-12
    x32 = x.astype(np.float32)
    ours32 = jax.jit(layers.resize_bilinear_align_corners, static_argnums=1)(jnp.asarray(x32), target)
    assert ours32.dtype == jnp.float32
    # Our weights come from float64 source positions; torch's float32 kernel rounds its scale to float32, which
    # moves the far positions by up to ~1e-6 relative (the 17 -> 68 case).
    assert _relative_error(ours32, _torch_resize(x32.astype(np.float64), target)) < 1e-6
    assert _relative_error(ours32, _torch_resize(x32, target)) < 1e-5


def test_resize_gradient_matches_torch():
    x = np.random.RandomState(7).randn(1, 5, 6, 2)
    weights = np.random.RandomState(8).randn(1, 11, 3, 2)
    tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_()
    resized = F.interpolate(tensor, size=(11, 3), mode="bilinear", align_corners=True)
    (resized * torch.from_numpy(weights.transpose(0, 3, 1, 2))).sum().backward()
    with jax.enable_x64(True):
        grad = jax.grad(lambda a: jnp.sum(layers.resize_bilinear_align_corners(a, (11, 3)) * weights))(jnp.asarray(x))
        assert _relative_error(grad, tensor.grad.permute(0, 2, 3, 1).numpy()) < 1e-12


def test_resize_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        layers.resize_bilinear_align_corners(jnp.zeros((1, 2, 2, 1)), (0, 3))
    with pytest.raises(ValueError, match="NHWC"):
        layers.resize_bilinear_align_corners(jnp.zeros((2, 2, 1)), (3, 3))
