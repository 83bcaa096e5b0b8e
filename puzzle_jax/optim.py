"""Optimizer of every training stage: the authors' PolyOptimizer (spec §4) in optax.

Owns the four parameter groups, their learning-rate multipliers and weight decay, the poly schedule
and the SGD update, including the option to reproduce the authors' momentum bug.

Parameter groups are decided by the parameter's **path** in the parameter pytree:

* pretrained vs scratch: a parameter whose first path entry is ``"model"`` belongs to the backbone
  (the authors' test is ``'model' in name``; our models keep the backbone under the attribute
  ``model``). Everything else (``classifier``, DeepLab's ASPP and decoder, ...) is trained from
  scratch.
* weight vs bias: the leaf name. ``kernel`` (conv / dense), ``scale`` (BN / GN gamma), ``weight``
  and ``embedding`` are weights; ``bias`` (conv / dense bias, BN / GN beta) is a bias.

==================  ========  ============
group               lr        weight decay
==================  ========  ============
pretrained_weight   1 x lr    wd
pretrained_bias     2 x lr    0
scratch_weight      10 x lr   wd
scratch_bias        20 x lr   0
==================  ========  ============

Path convention: params are the pure pytree of ``nnx.as_pure(nnx.split(model, nnx.Param, ...)[1])``
(an ``nnx.State`` of arrays) or plain nested dicts / lists: path entries are attribute names
(``str``) and list indices (``int``), e.g. ``("model", "layer1", 0, "conv1", "kernel")``. An
``nnx.State`` that still holds ``nnx.Variable`` objects also works: their trailing ``.value`` path
entry is skipped.

Update (torch SGD semantics, per group ``g``): ``d = grad + wd_g * param`` (coupled decay, before
the momentum), ``buf = m * buf + d`` (``buf = d`` on the first step), ``d = d + m * buf`` with
Nesterov, and ``param -= lr_g(step) * d`` where
``lr_g(step) = lr_g0 * (1 - step / total_steps) ** power``, ``step`` counted from 0. After
``total_steps`` the learning rate stays 0 (the base is clipped at 0; the authors instead freeze the
last value, which their loop never reaches).

``create_frozen_backbone_optimizer`` is the authors' AffinityNet optimizer: a single group of every parameter
outside the backbone (lr x1 and weight decay for all of them, biases included), the same update; the backbone's
parameters get none (not even weight decay), as they are not in the authors' optimizer.

``momentum_mode="authors"`` reproduces the PolyOptimizer bug: it passes ``weight_decay``
positionally into SGD's ``momentum`` slot, so the momentum equals the weight-decay value (1e-4,
4e-5): effectively plain SGD. ``momentum_mode="standard"`` uses the ``momentum`` argument (0.9).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

PARAMETER_GROUPS = ("pretrained_weight", "pretrained_bias", "scratch_weight", "scratch_bias")
MOMENTUM_MODES = ("authors", "standard")

# Learning-rate multiplier and whether weight decay applies, per group (spec §4).
_GROUP_LEARNING_RATE_MULTIPLIER = {
    "pretrained_weight": 1.0,
    "pretrained_bias": 2.0,
    "scratch_weight": 10.0,
    "scratch_bias": 20.0,
}
_GROUP_USES_WEIGHT_DECAY = {
    "pretrained_weight": True,
    "pretrained_bias": False,
    "scratch_weight": True,
    "scratch_bias": False,
}

PRETRAINED_ROOT = "model"
WEIGHT_LEAF_NAMES = ("kernel", "scale", "weight", "embedding")
BIAS_LEAF_NAMES = ("bias",)
# Path entries that wrap the array itself rather than name it (nnx.Variable's pytree child).
_WRAPPER_ENTRIES = ("value", "raw_value")


def _path_entry_to_key(entry: Any) -> str | int:
    """Turns a jax key-path entry (or an already plain str/int) into a str or int."""
    if isinstance(entry, jax.tree_util.DictKey):
        return entry.key
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.SequenceKey):
        return entry.idx
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return entry.key
    return entry


def _normalise_path(path: Sequence[Any]) -> tuple[str | int, ...]:
    keys = tuple(_path_entry_to_key(entry) for entry in path)
    while keys and keys[-1] in _WRAPPER_ENTRIES:
        keys = keys[:-1]
    return keys


def _path_to_string(path: Sequence[Any]) -> str:
    return ".".join(str(key) for key in path)


def parameter_group(path: Sequence[Any]) -> str:
    """Names the optimizer group of a parameter from its pytree path.

    Args:
      path: the parameter's path, either plain keys (``("model", "bn1", "scale")``) or the key
        entries of ``jax.tree_util.tree_flatten_with_path``.

    Returns:
      One of ``PARAMETER_GROUPS``.

    Raises:
      ValueError: if the leaf name is neither a weight nor a bias name.
    """
    keys = _normalise_path(path)
    if not keys:
        raise ValueError("Cannot assign an optimizer group to an empty parameter path.")
    leaf = keys[-1]
    if leaf in WEIGHT_LEAF_NAMES:
        kind = "weight"
    elif leaf in BIAS_LEAF_NAMES:
        kind = "bias"
    else:
        raise ValueError(
            f"Parameter {_path_to_string(keys)!r}: leaf name {leaf!r} is neither a weight "
            f"{WEIGHT_LEAF_NAMES} nor a bias {BIAS_LEAF_NAMES}; only trainable parameters "
            "(nnx.Param) belong in the optimizer."
        )
    origin = "pretrained" if keys[0] == PRETRAINED_ROOT else "scratch"
    return f"{origin}_{kind}"


def learning_rate_at(
    step: jax.Array | int,
    *,
    learning_rate: float,
    total_steps: int,
    poly_power: float = 0.9,
    group: str = "pretrained_weight",
) -> jax.Array:
    """Poly learning rate of one group at a step (for the schedule and for logging).

    ``lr_g0 * max(0, 1 - step / total_steps) ** poly_power`` with ``lr_g0 = learning_rate x`` the
    group's multiplier; the default group gives the base learning rate.

    Args:
      step: 0-based step (int or traced integer array).
      learning_rate: base learning rate (``lr``).
      total_steps: steps of the run (the authors' ``max_step``).
      poly_power: exponent (0.9).
      group: one of ``PARAMETER_GROUPS``.

    Returns:
      Scalar learning rate: float32, or float64 under ``jax.enable_x64`` (the float64 parity tests of the training
      step, which compare it with the authors' Python-float schedule).
    """
    if group not in _GROUP_LEARNING_RATE_MULTIPLIER:
        raise ValueError(
            f"Unknown parameter group {group!r}; allowed values are {', '.join(PARAMETER_GROUPS)}."
        )
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps!r}.")
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    # (total - step) / total rather than 1 - step / total: exact near the end of the run in float32.
    steps_left = jnp.asarray(total_steps, dtype) - jnp.asarray(step, dtype)
    remaining = jnp.clip(steps_left / jnp.asarray(total_steps, dtype), 0.0, 1.0)
    base = jnp.asarray(learning_rate * _GROUP_LEARNING_RATE_MULTIPLIER[group], dtype)
    return base * remaining**poly_power


def _poly_sgd(
    *,
    learning_rate: float,
    weight_decay: float,
    total_steps: int,
    poly_power: float,
    nesterov: bool,
    momentum: float,
) -> optax.GradientTransformation:
    """torch SGD (coupled weight decay, momentum, Nesterov) at the poly learning rate from ``learning_rate``."""

    def schedule(count: jax.Array) -> jax.Array:
        return learning_rate_at(count, learning_rate=learning_rate, total_steps=total_steps, poly_power=poly_power)

    transforms = []
    if weight_decay:
        # Coupled decay: added to the gradient before the momentum buffer, as torch SGD does.
        transforms.append(optax.add_decayed_weights(weight_decay))
    if momentum:
        # optax.trace starts from a zero buffer, so its first step is buf = grad as in torch, and
        # its Nesterov form grad + m * buf is torch's.
        transforms.append(optax.trace(decay=momentum, nesterov=nesterov))
    transforms.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*transforms)


def _sgd_for_group(
    group: str,
    *,
    learning_rate: float,
    weight_decay: float,
    total_steps: int,
    poly_power: float,
    nesterov: bool,
    momentum: float,
) -> optax.GradientTransformation:
    return _poly_sgd(
        learning_rate=learning_rate * _GROUP_LEARNING_RATE_MULTIPLIER[group],
        weight_decay=weight_decay if _GROUP_USES_WEIGHT_DECAY[group] else 0.0,
        total_steps=total_steps,
        poly_power=poly_power,
        nesterov=nesterov,
        momentum=momentum,
    )


def _effective_momentum(momentum_mode: str, weight_decay: float, momentum: float) -> float:
    """The SGD momentum of a momentum mode (``"authors"``: the weight decay, their PolyOptimizer's bug)."""
    if momentum_mode not in MOMENTUM_MODES:
        raise ValueError(
            f"Unknown momentum_mode {momentum_mode!r}; allowed values are "
            f"{', '.join(MOMENTUM_MODES)}."
        )
    return weight_decay if momentum_mode == "authors" else momentum


def create_optimizer(
    params: Any,
    *,
    learning_rate: float,
    weight_decay: float,
    total_steps: int,
    poly_power: float = 0.9,
    nesterov: bool = True,
    momentum_mode: str = "authors",
    momentum: float = 0.9,
) -> optax.GradientTransformation:
    """Builds the four-group poly-SGD optimizer of the authors' trainers.

    Args:
      params: the parameter pytree the optimizer will be used with (pure ``nnx.State`` or nested
        dicts); only read to validate that every leaf maps to a group, so errors show up here and
        not inside ``jit``.
      learning_rate: base learning rate of the pretrained weights (0.1 classifier, 0.007 DeepLab).
      weight_decay: decay of the weight groups (1e-4 classifier, 4e-5 DeepLab); biases get none.
      total_steps: length of the poly schedule.
      poly_power: poly exponent (0.9).
      nesterov: Nesterov momentum (the authors' default True).
      momentum_mode: ``"authors"`` (momentum = ``weight_decay``, the PolyOptimizer bug) or
        ``"standard"`` (momentum = ``momentum``).
      momentum: momentum used in ``"standard"`` mode.

    Returns:
      An ``optax.GradientTransformation``; ``init(params)`` / ``update(grads, state, params)`` need
      the params because of the coupled weight decay.

    Raises:
      ValueError: for an unknown ``momentum_mode``, a non-positive ``total_steps``, or a parameter
        whose path does not name a weight or a bias.
    """
    effective_momentum = _effective_momentum(momentum_mode, weight_decay, momentum)
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps!r}.")

    def label_tree(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda path, _: parameter_group(path), tree)

    # Fail early, outside jit, on a parameter no group claims.
    label_tree(params)

    transforms = {
        group: _sgd_for_group(
            group,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            total_steps=total_steps,
            poly_power=poly_power,
            nesterov=nesterov,
            momentum=effective_momentum,
        )
        for group in PARAMETER_GROUPS
    }
    return optax.multi_transform(transforms, label_tree)


def create_frozen_backbone_optimizer(
    params: Any,
    *,
    learning_rate: float,
    weight_decay: float,
    total_steps: int,
    poly_power: float = 0.9,
    nesterov: bool = True,
    momentum_mode: str = "authors",
    momentum: float = 0.9,
) -> optax.GradientTransformation:
    """The authors' optimizer of a model whose backbone is fixed (AffinityNet): one group of every parameter outside
    the backbone at ``learning_rate`` with ``weight_decay`` (biases and GroupNorm shifts included, as their single
    group has it), the same poly SGD and momentum modes as ``create_optimizer``; the backbone's parameters (path
    root ``model``) get no update at all, weight decay included.

    Args:
      params: the parameter pytree, only read to check that some parameter is trained.
      learning_rate, weight_decay, total_steps, poly_power, nesterov, momentum_mode, momentum: as in
        ``create_optimizer``, for the one group.

    Raises:
      ValueError: for an unknown ``momentum_mode``, a non-positive ``total_steps``, or a model with nothing outside
        its backbone.
    """
    effective_momentum = _effective_momentum(momentum_mode, weight_decay, momentum)
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps!r}.")

    def label_tree(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if _normalise_path(path)[0] == PRETRAINED_ROOT else "trained", tree
        )

    if "trained" not in jax.tree.leaves(label_tree(params)):
        raise ValueError(f"Every parameter is under {PRETRAINED_ROOT!r} (the backbone): there is nothing to train.")
    trained = _poly_sgd(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        total_steps=total_steps,
        poly_power=poly_power,
        nesterov=nesterov,
        momentum=effective_momentum,
    )
    return optax.multi_transform({"trained": trained, "frozen": optax.set_to_zero()}, label_tree)
