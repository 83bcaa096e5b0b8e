"""Model FLOPs of a JAX function, counted from its jaxpr, the same on every backend.

Why not XLA's ``compiled.cost_analysis()``: XLA:GPU leaves out the convolutions it hands to cuDNN as custom calls
(11.9 instead of ~735 GFLOP per image for a ResNeSt-101 Puzzle-CAM step on an H100), so an MFU taken from it is
wrong by ~60x. The jaxpr is traced before any backend rewrites it.

Usage::

    count = count_flops(step, state, batch)       # arrays or jax.ShapeDtypeStruct; nothing is executed
    count.total                                   # FLOPs of one call, an int
    count.by_primitive                            # {"conv_general_dilated": ..., "dot_general": ...}
    count_jaxpr_flops(jax.jit(step).trace(state, batch).jaxpr)   # the same from a jaxpr already traced

What is counted (the "model FLOPs" convention: convolutions and matrix products, a multiply-add = 2 FLOPs):

* ``dot_general``: 2 x batch x M x N x K, i.e. 2 x (output elements) x (contracted elements).
* ``conv_general_dilated``: 2 x the multiply-adds that pair a kernel tap with a real input element: for every output
  element, (kernel input features, i.e. input features per group) x (kernel taps that land on a real input
  element). Taps that land on zero padding or on the holes of an lhs dilation (a transposed convolution, such as
  the input gradient of a strided convolution) multiply a zero no efficient kernel computes and are not counted.
  This is XLA's own HloCostAnalysis convention, so for convolutions the count equals XLA:CPU's exactly, and with
  it the input gradient and the kernel gradient of any convolution each cost exactly its forward pass. Where no
  tap falls on padding (VALID padding, or SAME padding that pads nothing) it is the textbook
  2 x N x Ho x Wo x Cout x kh x kw x Cin / groups; with padding it is smaller. ``feature_group_count`` and
  ``batch_group_count`` (the latter appears in the kernel gradient of a grouped convolution) need no special
  case: the kernel's input-feature dimension already holds the features one output element sums over, and the
  output's batch and feature dimensions already hold what the groups produce.
* Not counted: elementwise operations, reductions, pooling, resizing, normalisation, the optimizer update. They
  are a few percent of a convolutional network's FLOPs and are bound by memory, not by the FLOP peak.

Nested jaxprs are counted where they run:

* ``scan``: its body x ``length``.
* ``while``: its body and its condition once each (the trip count is a run-time value; a ``fori_loop`` with static
  bounds traces to a ``scan`` and is multiplied).
* ``cond``: the most expensive branch.
* ``shard_map``: its body (traced on per-shard shapes) x the number of shards over the axes it makes manual.
  (``pmap`` traces to ``jit`` + ``shard_map`` in this JAX version.)
* ``jit``/``pjit``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat``/``checkpoint`` and any other primitive
  whose parameters hold a jaxpr: every such jaxpr once. Recomputation under ``remat`` in a gradient is therefore
  counted (those FLOPs do run), and of a ``custom_jvp``/``custom_vjp`` function only the primal computation that
  the jaxpr calls is counted; its rules appear as ordinary equations once differentiated.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.extend import core as jax_core


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs of one call of a function: per counted primitive and in total.

    Attributes:
      by_primitive: FLOPs per primitive name (``conv_general_dilated``, ``dot_general``); a primitive that does
        not occur is absent.
    """

    by_primitive: Mapping[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_primitive.values())


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> FlopCount:
    """Model FLOPs of ``fn(*args, **kwargs)``, traced with ``jax.make_jaxpr``; nothing is executed.

    Args:
      fn: any JAX-traceable function, jitted or not.
      *args, **kwargs: its arguments: arrays, ``jax.ShapeDtypeStruct`` or pytrees of them.
    """
    return count_jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))


def count_jaxpr_flops(jaxpr: jax_core.Jaxpr | jax_core.ClosedJaxpr) -> FlopCount:
    """Model FLOPs of a traced jaxpr (e.g. ``jax.jit(fn).trace(...).jaxpr`` or ``jax.make_jaxpr(fn)(...)``)."""
    # Keyed by id(): a jaxpr object reached twice (a function jitted once and called twice) is walked once. The
    # keys stay valid because every counted jaxpr stays referenced by the outer one for the whole walk.
    memo: dict[int, Counter[str]] = {}
    counts = _count(_open(jaxpr), memo)
    return FlopCount({name: flops for name, flops in counts.items() if flops})


def _open(jaxpr: jax_core.Jaxpr | jax_core.ClosedJaxpr) -> jax_core.Jaxpr:
    return jaxpr.jaxpr if isinstance(jaxpr, jax_core.ClosedJaxpr) else jaxpr


def _count(jaxpr: jax_core.Jaxpr, memo: dict[int, Counter[str]]) -> Counter[str]:
    """The FLOPs of one execution of ``jaxpr``; the returned Counter is shared through ``memo``: do not mutate it."""
    if id(jaxpr) in memo:
        return memo[id(jaxpr)]
    counts: Counter[str] = Counter()
    for equation in jaxpr.eqns:
        counts.update(_count_equation(equation, memo))
    memo[id(jaxpr)] = counts
    return counts


def _count_equation(equation: jax_core.JaxprEqn, memo: dict[int, Counter[str]]) -> Counter[str]:
    name = equation.primitive.name
    params = equation.params
    if name in _LEAF_COUNTERS:
        return Counter({name: _LEAF_COUNTERS[name](equation)})
    if name == "scan":
        return _scaled(_count(_open(params["jaxpr"]), memo), params["length"])
    if name == "cond":
        return max((_count(_open(branch), memo) for branch in params["branches"]), key=lambda c: c.total())
    if name == "shard_map":
        return _scaled(_count(_open(params["jaxpr"]), memo), _shard_count(params))
    # jit, custom_jvp_call, custom_vjp_call, remat, while (body and condition), and whatever else nests a jaxpr.
    counts: Counter[str] = Counter()
    for sub_jaxpr in jax_core.jaxprs_in_params(params):
        counts.update(_count(sub_jaxpr, memo))
    return counts


def _scaled(counts: Counter[str], factor: int) -> Counter[str]:
    return Counter({name: flops * factor for name, flops in counts.items()})


def _shard_count(params: Mapping[str, Any]) -> int:
    """How many copies of a ``shard_map`` body run: the product of the sizes of the mesh axes it makes manual."""
    axis_sizes = dict(params["mesh"].shape)
    manual_axes = params.get("newly_manual_axes", axis_sizes.keys())
    return math.prod(axis_sizes[axis] for axis in manual_axes)


def _dot_general_flops(equation: jax_core.JaxprEqn) -> int:
    lhs_shape = equation.invars[0].aval.shape
    (lhs_contracting, _), _ = equation.params["dimension_numbers"]
    output_elements = math.prod(equation.outvars[0].aval.shape)  # batch x M x N
    contracted_elements = math.prod(lhs_shape[dim] for dim in lhs_contracting)  # K
    return 2 * output_elements * contracted_elements


def _conv_general_dilated_flops(equation: jax_core.JaxprEqn) -> int:
    params = equation.params
    lhs_shape, rhs_shape = (var.aval.shape for var in equation.invars[:2])
    out_shape = equation.outvars[0].aval.shape
    # Each spec lists dimension indices: (batch, feature, *spatial) for lhs and out, (out feature, in feature,
    # *spatial) for rhs.
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    spatial_rank = len(lhs_spec) - 2
    lhs_dilation = params.get("lhs_dilation") or (1,) * spatial_rank
    rhs_dilation = params.get("rhs_dilation") or (1,) * spatial_rank
    real_taps = 1
    for axis in range(spatial_rank):
        real_taps *= _real_tap_count(
            input_size=lhs_shape[lhs_spec[2 + axis]],
            kernel_size=rhs_shape[rhs_spec[2 + axis]],
            output_size=out_shape[out_spec[2 + axis]],
            stride=params["window_strides"][axis],
            padding_low=params["padding"][axis][0],
            lhs_dilation=lhs_dilation[axis],
            rhs_dilation=rhs_dilation[axis],
        )
    output_batch = out_shape[out_spec[0]]
    output_features = out_shape[out_spec[1]]
    kernel_input_features = rhs_shape[rhs_spec[1]]
    return 2 * output_batch * output_features * kernel_input_features * real_taps


def _real_tap_count(
    *,
    input_size: int,
    kernel_size: int,
    output_size: int,
    stride: int,
    padding_low: int,
    lhs_dilation: int,
    rhs_dilation: int,
) -> int:
    """Along one spatial axis: the (output position, kernel tap) pairs whose tap lands on a real input element.

    Positions are in the padded, lhs-dilated input, where input element i sits at ``padding_low + i *
    lhs_dilation``; the spatial axes are independent, so the count of the whole window is the product over axes.
    """
    outputs = np.arange(output_size, dtype=np.int64)[:, None]
    taps = np.arange(kernel_size, dtype=np.int64)[None, :]
    offset = outputs * stride + taps * rhs_dilation - padding_low  # from input element 0, in dilated units
    real = (offset >= 0) & (offset % lhs_dilation == 0) & (offset // lhs_dilation < input_size)
    return int(real.sum())


_LEAF_COUNTERS: dict[str, Callable[[jax_core.JaxprEqn], int]] = {
    "conv_general_dilated": _conv_general_dilated_flops,
    "dot_general": _dot_general_flops,
}
