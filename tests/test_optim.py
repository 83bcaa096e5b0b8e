"""Tests of puzzle_jax.optim: groups by path, poly schedule, steps equal to the authors' SGD."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from puzzle_jax import optim


@pytest.mark.parametrize(
    "path,group",
    [
        (("model", "conv1", "kernel"), "pretrained_weight"),
        (("model", "bn1", "scale"), "pretrained_weight"),
        (("model", "bn1", "bias"), "pretrained_bias"),
        (("model", "layer3", 4, "conv2", "fc1", "bias"), "pretrained_bias"),
        (("model", "layer3", 4, "conv2", "fc1", "kernel"), "pretrained_weight"),
        (("classifier", "kernel"), "scratch_weight"),
        (("aspp", "branches", 1, "gn", "scale"), "scratch_weight"),
        (("decoder", "classifier", "bias"), "scratch_bias"),
        # "model" counts only as the top-level attribute, not deeper down.
        (("decoder", "model", "kernel"), "scratch_weight"),
        # nnx.Variable's trailing ".value" entry is skipped.
        (("model", "bn1", "bias", "value"), "pretrained_bias"),
    ],
)
def test_parameter_group_of_representative_paths(path, group):
    assert optim.parameter_group(path) == group


def test_parameter_group_rejects_non_parameter_leaves():
    with pytest.raises(ValueError, match="model.bn1.mean.*neither a weight"):
        optim.parameter_group(("model", "bn1", "mean"))


class _TinyBackbone(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, rngs=rngs)
        self.layer1 = nnx.List([nnx.Conv(4, 4, (1, 1), rngs=rngs)])


class _TinyClassifier(nnx.Module):
    def __init__(self, rngs):
        self.model = _TinyBackbone(rngs)
        self.classifier = nnx.Conv(4, 2, (1, 1), use_bias=False, rngs=rngs)


def test_groups_of_a_real_nnx_state():
    module = _TinyClassifier(nnx.Rngs(0))
    _, params, _ = nnx.split(module, nnx.Param, nnx.BatchStat)
    for tree in (nnx.as_pure(params), params):
        groups = {}
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
            name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            groups[name.removesuffix(".value")] = optim.parameter_group(path)
        assert groups == {
            "model.conv1.kernel": "pretrained_weight",
            "model.bn1.scale": "pretrained_weight",
            "model.bn1.bias": "pretrained_bias",
            "model.layer1.0.kernel": "pretrained_weight",
            "model.layer1.0.bias": "pretrained_bias",
            "classifier.kernel": "scratch_weight",
        }


def test_learning_rate_at_chosen_steps():
    lr, total = 0.1, 4950
    at = lambda step, group="pretrained_weight": float(  # noqa: E731
        optim.learning_rate_at(step, learning_rate=lr, total_steps=total, group=group)
    )
    np.testing.assert_allclose(at(0), 0.1, rtol=1e-6)
    np.testing.assert_allclose(at(2475), 0.1 * 0.5**0.9, rtol=1e-6)
    np.testing.assert_allclose(at(4949), 0.1 * (1 / 4950) ** 0.9, rtol=1e-5)
    assert at(4950) == 0.0
    assert at(6000) == 0.0  # clipped, never NaN
    np.testing.assert_allclose(at(100, "pretrained_bias"), 2 * at(100), rtol=1e-6)
    np.testing.assert_allclose(at(100, "scratch_weight"), 10 * at(100), rtol=1e-6)
    np.testing.assert_allclose(at(100, "scratch_bias"), 20 * at(100), rtol=1e-6)
    jitted = jax.jit(lambda s: optim.learning_rate_at(s, learning_rate=lr, total_steps=total))
    np.testing.assert_allclose(float(jitted(jnp.int32(2475))), 0.1 * 0.5**0.9, rtol=1e-6)


class _TorchPolyOptimizer(torch.optim.SGD):
    """The authors' PolyOptimizer (spec §4) transcribed, positional-argument quirk included."""

    def __init__(self, params, lr, weight_decay, max_step, momentum=0.9, nesterov=False):
        # The quirk: weight_decay lands in SGD's momentum slot; "momentum" becomes the poly power.
        super().__init__(params, lr, weight_decay, nesterov=nesterov)
        self.global_step = 0
        self.max_step = max_step
        self.poly_power = momentum
        self.initial_learning_rates = [group["lr"] for group in self.param_groups]

    def step(self, closure=None):
        if self.global_step < self.max_step:
            multiplier = (1 - self.global_step / self.max_step) ** self.poly_power
            for group, initial in zip(self.param_groups, self.initial_learning_rates):
                group["lr"] = initial * multiplier
        super().step(closure)
        self.global_step += 1


def _small_params(seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return {
        "model": {
            "conv1": {"kernel": normal(3, 3, 2, 4)},
            "bn1": {"scale": normal(4), "bias": normal(4)},
            "layer1": {0: {"fc1": {"kernel": normal(1, 1, 4, 3), "bias": normal(3)}}},
        },
        "classifier": {"kernel": normal(1, 1, 4, 3)},
        "decoder": {"gn": {"scale": normal(3), "bias": normal(3)}, "conv": {"bias": normal(3)}},
    }


def _torch_param_groups(flat_params, learning_rate, weight_decay):
    """The authors' four groups, built from the same path rule spelled out independently."""
    settings = {
        ("pretrained", "weight"): (1, weight_decay),
        ("pretrained", "bias"): (2, 0.0),
        ("scratch", "weight"): (10, weight_decay),
        ("scratch", "bias"): (20, 0.0),
    }
    members = {key: [] for key in settings}
    for path, tensor in flat_params.items():
        origin = "pretrained" if path[0] == "model" else "scratch"
        kind = "bias" if path[-1] == "bias" else "weight"
        members[(origin, kind)].append(tensor)
    return [
        {"params": members[key], "lr": multiplier * learning_rate, "weight_decay": decay}
        for key, (multiplier, decay) in settings.items()
    ]


def _keys(path):
    return tuple(getattr(entry, "key", entry) for entry in path)


@pytest.mark.parametrize("momentum_mode", ["authors", "standard"])
def test_steps_match_torch_poly_optimizer(momentum_mode):
    learning_rate, weight_decay, total_steps, num_steps = 0.01, 0.05, 6, 6
    params = _small_params()
    flat = {_keys(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    torch_params = {path: torch.tensor(leaf, requires_grad=True) for path, leaf in flat.items()}
    groups = _torch_param_groups(torch_params, learning_rate, weight_decay)
    if momentum_mode == "authors":
        torch_optimizer = _TorchPolyOptimizer(
            groups, learning_rate, weight_decay, total_steps, 0.9, nesterov=True
        )
    else:
        torch_optimizer = torch.optim.SGD(groups, learning_rate, momentum=0.9, nesterov=True)
        initial = [group["lr"] for group in torch_optimizer.param_groups]

    optimizer = optim.create_optimizer(
        params,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        total_steps=total_steps,
        momentum_mode=momentum_mode,
    )
    jax_params = jax.tree.map(jnp.asarray, params)
    state = optimizer.init(jax_params)

    @jax.jit
    def step(current, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, current)
        return jax.tree.map(lambda p, u: p + u, current, updates), opt_state

    rng = np.random.default_rng(1)
    for step_index in range(num_steps):
        grads = {
            path: rng.standard_normal(leaf.shape).astype(np.float32) for path, leaf in flat.items()
        }
        for path, tensor in torch_params.items():
            tensor.grad = torch.from_numpy(grads[path])
        if momentum_mode == "standard":
            multiplier = (1 - step_index / total_steps) ** 0.9
            for group, base in zip(torch_optimizer.param_groups, initial):
                group["lr"] = base * multiplier
        torch_optimizer.step()
        grad_tree = jax.tree_util.tree_map_with_path(
            lambda path, _, grads=grads: jnp.asarray(grads[_keys(path)]), params
        )
        jax_params, state = step(jax_params, state, grad_tree)
        for path, leaf in jax.tree_util.tree_flatten_with_path(jax_params)[0]:
            np.testing.assert_allclose(
                np.asarray(leaf),
                torch_params[_keys(path)].detach().numpy(),
                atol=1e-6,
                rtol=1e-6,
                err_msg=f"step {step_index}, parameter {_keys(path)}",
            )
    if momentum_mode == "authors":
        assert torch_optimizer.param_groups[0]["momentum"] == weight_decay  # the quirk is real


def test_momentum_mode_changes_the_update_and_bad_values_are_rejected():
    params = {"classifier": {"kernel": jnp.ones((2,))}}
    grads = {"classifier": {"kernel": jnp.ones((2,))}}
    results = {}
    for mode in ("authors", "standard"):
        optimizer = optim.create_optimizer(
            params, learning_rate=0.1, weight_decay=0.0, total_steps=10, momentum_mode=mode
        )
        state = optimizer.init(params)
        _, state = optimizer.update(grads, state, params)
        updates, _ = optimizer.update(grads, state, params)
        results[mode] = float(updates["classifier"]["kernel"][0])
    # Step 1, scratch weight lr = 1.0 * 0.9**0.9; no decay. Nesterov with m=0.9: g + m*(m*g + g).
    lr = 1.0 * (1 - 1 / 10) ** 0.9
    np.testing.assert_allclose(results["authors"], -lr, rtol=1e-6)  # momentum = wd = 0
    np.testing.assert_allclose(results["standard"], -lr * (1 + 0.9 * 1.9), rtol=1e-6)
    with pytest.raises(ValueError, match="'sgd'.*authors, standard"):
        optim.create_optimizer(
            params, learning_rate=0.1, weight_decay=0.0, total_steps=10, momentum_mode="sgd"
        )
    with pytest.raises(ValueError, match="running_mean"):
        optim.create_optimizer(
            {"model": {"bn": {"running_mean": jnp.ones(2)}}},
            learning_rate=0.1,
            weight_decay=0.0,
            total_steps=10,
        )


@pytest.mark.parametrize("momentum_mode", ["authors", "standard"])
def test_frozen_backbone_optimizer_is_the_authors_single_group_and_leaves_the_backbone(momentum_mode):
    """AffinityNet's optimizer: the authors' PolyOptimizer on one group of the non-backbone parameters (lr and weight
    decay on every one of them, biases included); the backbone's parameters, not in their optimizer, never move."""
    from benchmarks import authors_torch

    learning_rate, weight_decay, total_steps = 0.1, 0.05, 5
    params = _small_params()
    flat = {_keys(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    torch_params = {path: torch.tensor(leaf, requires_grad=True) for path, leaf in flat.items() if path[0] != "model"}
    torch_optimizer = authors_torch.PolyOptimizer(
        [{"params": list(torch_params.values()), "lr": learning_rate, "weight_decay": weight_decay}],
        lr=learning_rate,
        weight_decay=weight_decay,
        max_step=total_steps,
        nesterov=True,
        momentum=momentum_mode,
    )
    optimizer = optim.create_frozen_backbone_optimizer(
        params,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        total_steps=total_steps,
        momentum_mode=momentum_mode,
    )
    jax_params = jax.tree.map(jnp.asarray, params)
    state = optimizer.init(jax_params)
    rng = np.random.default_rng(2)
    for step_index in range(total_steps):
        grads = {path: rng.standard_normal(leaf.shape).astype(np.float32) for path, leaf in flat.items()}
        for path, tensor in torch_params.items():
            tensor.grad = torch.from_numpy(grads[path])
        torch_optimizer.step()
        grad_tree = jax.tree_util.tree_map_with_path(lambda path, _, g=grads: jnp.asarray(g[_keys(path)]), params)
        updates, state = optimizer.update(grad_tree, state, jax_params)
        jax_params = optax.apply_updates(jax_params, updates)
        for path, leaf in jax.tree_util.tree_flatten_with_path(jax_params)[0]:
            expected = flat[_keys(path)] if _keys(path)[0] == "model" else torch_params[_keys(path)].detach().numpy()
            np.testing.assert_allclose(
                np.asarray(leaf), expected, atol=1e-6, rtol=1e-6, err_msg=f"step {step_index}, {_keys(path)}"
            )
    with pytest.raises(ValueError, match="nothing to train"):
        optim.create_frozen_backbone_optimizer(
            {"model": params["model"]}, learning_rate=0.1, weight_decay=0.0, total_steps=1
        )
