"""Building blocks with PyTorch semantics: BatchNorm in three modes, convolution, pooling.

This module owns the numerics that must match the authors' PyTorch code exactly:

* ``BatchNorm``: epsilon 1e-5, torch momentum 0.1 (``running = 0.9 * running + 0.1 * batch``), the running
  variance updated with the *unbiased* batch variance while the input is normalised with the biased one, and
  three modes (``global``, ``per_replica``, ``frozen``; see the class docstring), and two ways to compute the
  batch statistics (``two_pass``, ``one_pass``; see ``BN_STATISTICS``).
* ``max_pool2d`` / ``avg_pool2d``: padding, ``ceil_mode`` and ``count_include_pad`` exactly as
  ``torch.nn.functional`` defines them (max pooling pads with -inf, not with zeros).
* ``Conv2d``: torch-style convolution arguments (symmetric padding, dilation, groups) and
  torch's Kaiming-normal initialisations.
* ``resize_bilinear_align_corners``: ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=True)``,
  which ``jax.image.resize`` does not offer (its bilinear resize is torch's ``align_corners=False``).

Parameter-free layers (``ReLU``, ``MaxPool2d``, ``AvgPool2d``) are tiny modules so that they can sit inside an
``nnx.List`` at the same index as in a torch ``nn.Sequential``; that keeps the torch keys (``conv1.6.weight``,
``downsample.1.weight``) valid NNX paths. They hold only static configuration, never variables.

Everything is NHWC.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BN_MODES = ("global", "per_replica", "frozen")
# How training-mode BatchNorm computes a batch's statistics and its gradient:
#   * ``two_pass``: the mean, then the mean of squared deviations from it (two reads of the activation, the second
#     waiting for the first); the gradient by automatic differentiation, whose backward pass has five
#     activation-sized reductions (algebraically redundant ones among them).
#   * ``one_pass``: sums of (x - shift) and (x - shift)^2 in one read (XLA fuses the two sibling reductions), with a
#     per-channel shift taken from the data itself (the first position of the group's first image) so that the
#     difference of the two moments does not cancel: the float32 error of the variance is that of the two-pass
#     formula times about 1 + ((shift - mean) / std)^2, a small factor for any shift drawn from the data; and the
#     closed-form gradient (``_batch_norm_one_pass``): two sibling reductions and one elementwise pass.
BN_STATISTICS = ("two_pass", "one_pass")


def _statistics_dtype(dtype) -> jnp.dtype:
    # At least float32 (bfloat16 is promoted; float64, used by the parity tests under jax.enable_x64, is kept).
    return jnp.promote_types(dtype, jnp.float32)


def _scale_and_shift(x, mean, inverse_std, scale, bias):
    # (x - mean) first, as torch does: folding the mean into the bias (x * a + (b - mean * a)) loses precision when
    # |mean| >> std.
    return (x - mean) * (inverse_std * scale) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_one_pass(groups, scale, bias, epsilon):
    """Training BatchNorm of ``groups`` (G, n, ..., C) with each group's statistics over its middle axes.

    Returns ``(normalised, mean, variance)`` in the statistics dtype, mean and biased variance shaped (G, 1, ..., C).
    ``scale`` and ``bias`` are (C,) in the statistics dtype. The gradient is the closed form
    dx = scale / (n std) * (n dy - sum(dy) - x_hat sum(dy x_hat)) (plus the terms of the mean and variance outputs),
    so the backward pass reads dy and x once, for two sibling reductions, and once more to write dx.
    """
    return _batch_norm_one_pass_forward(groups, scale, bias, epsilon)[0]


def _batch_norm_one_pass_forward(groups, scale, bias, epsilon):
    x = groups.astype(_statistics_dtype(groups.dtype))
    axes = tuple(range(1, x.ndim - 1))
    # The shift only conditions the sums: mean and variance do not depend on it in exact arithmetic.
    shift = x[(slice(None),) + (slice(0, 1),) * len(axes)]
    shifted = x - shift
    shifted_mean = jnp.mean(shifted, axis=axes, keepdims=True)
    mean_square = jnp.mean(jnp.square(shifted), axis=axes, keepdims=True)
    mean = shift + shifted_mean
    var = jnp.maximum(mean_square - jnp.square(shifted_mean), 0.0)
    inverse = jax.lax.rsqrt(var + epsilon)
    normalized = _scale_and_shift(x, mean, inverse, scale, bias)
    # The activation is kept in its own dtype (bfloat16 stays bfloat16), as automatic differentiation would.
    return (normalized, mean, var), (groups, mean, inverse, scale)


def _batch_norm_one_pass_backward(epsilon, residuals, cotangents):
    del epsilon
    groups, mean, inverse, scale = residuals
    d_normalized, d_mean, d_var = cotangents
    x = groups.astype(mean.dtype)
    axes = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1])
    centered = x - mean
    x_hat = centered * inverse
    sum_d = jnp.sum(d_normalized, axis=axes, keepdims=True)
    sum_d_x_hat = jnp.sum(d_normalized * x_hat, axis=axes, keepdims=True)
    d_x = (inverse * scale / count) * (count * d_normalized - sum_d - x_hat * sum_d_x_hat)
    # The statistics outputs (running averages take them under stop_gradient, so these are zeros there).
    d_x = d_x + d_mean / count + d_var * (2.0 / count) * centered
    channels = scale.shape[-1]
    d_scale = jnp.sum(sum_d_x_hat.reshape(-1, channels), axis=0)
    d_bias = jnp.sum(sum_d.reshape(-1, channels), axis=0)
    return d_x.astype(groups.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


_batch_norm_one_pass.defvjp(_batch_norm_one_pass_forward, _batch_norm_one_pass_backward)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def kaiming_std(shape: Sequence[int], mode: str) -> float:
    """Standard deviation of ``torch.nn.init.kaiming_normal_`` (gain sqrt(2)) for an HWIO kernel.

    ``mode="fan_out"`` (kh * kw * out) is what torchvision and ResNeSt use for backbone convolutions;
    ``mode="fan_in"`` (kh * kw * in / groups) is torch's default, used by the authors' classifier head.
    """
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"init_mode must be 'fan_in' or 'fan_out', got {mode!r}")
    receptive = math.prod(shape[:-2])
    fan = receptive * (shape[-2] if mode == "fan_in" else shape[-1])
    return math.sqrt(2.0 / fan)


class KernelInitializer:
    """Initialises all the convolution kernels of a model from one normal draw.

    A model constructor takes one key from ``nnx.Rngs``, passes this object to its ``Conv2d`` layers as
    ``rngs`` (they get placeholders and register themselves), and calls ``finalize()`` at its end, which draws
    ``sum(kernel sizes)`` standard normal values at once and hands each kernel its slice times its std, in
    creation order. Two costs are avoided that way, both of which made creating a ResNeSt take minutes on CPU:
    one RNG kernel compiled per distinct shape (eagerly) or one inlined per layer (under ``jax.jit``, where
    XLA's compile time grows with their number), and one ``nnx.Rngs`` counter mutation per layer (under a
    trace each costs time proportional to the trace so far). Eager and jitted creation give the same values.
    """

    def __init__(self, rngs: nnx.Rngs | jax.Array):
        self.key = rngs.params() if isinstance(rngs, nnx.Rngs) else rngs
        self.traced = isinstance(self.key, jax.core.Tracer)
        self.pending: list[tuple[nnx.Param, float]] = []

    def placeholder(self, shape: Sequence[int]) -> jax.Array:
        # Outside a trace, numpy zeros avoid compiling one fill kernel per shape; inside, jnp.zeros avoids
        # embedding large constants in the program.
        if self.traced:
            return jnp.zeros(shape, jnp.float32)
        return jnp.asarray(np.zeros(shape, np.float32))

    def register(self, kernel: nnx.Param, std: float) -> None:
        self.pending.append((kernel, std))

    def finalize(self) -> None:
        """Draws the values and writes every registered kernel; call once, after the last ``Conv2d``."""
        sizes = [math.prod(kernel.shape) for kernel, _ in self.pending]
        flat = jax.random.normal(self.key, (sum(sizes),), jnp.float32)
        if not self.traced:
            flat = np.asarray(flat)
        offset = 0
        for (kernel, std), size in zip(self.pending, sizes, strict=True):
            values = flat[offset : offset + size].reshape(kernel.shape) * np.float32(std)
            kernel.set_value(jnp.asarray(values))
            offset += size
        self.pending = []


class Conv2d(nnx.Module):
    """An NHWC convolution that computes what ``torch.nn.Conv2d`` with the same arguments computes.

    Variables: ``kernel`` (HWIO; torch's OIHW transposed by (2, 3, 1, 0)) and, if ``use_bias``, ``bias``.
    Grouped convolutions order output channels by group in both frameworks.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        use_bias: bool = False,
        init_mode: str = "fan_out",
        dtype=jnp.float32,
        rngs: nnx.Rngs | KernelInitializer,
    ):
        """Creates the layer.

        Args:
          in_features: input channels.
          out_features: output channels.
          kernel_size: int or (kh, kw).
          stride: int or (sh, sw).
          padding: symmetric zero padding, int or (ph, pw), as torch's ``padding``.
          dilation: int or (dh, dw).
          groups: torch ``groups``.
          use_bias: torch ``bias`` (initialised to zeros).
          init_mode: Kaiming-normal fan mode of the kernel init, ``"fan_out"`` (ResNet/ResNeSt backbones)
            or ``"fan_in"`` (torch's ``kaiming_normal_`` default).
          dtype: compute dtype; parameters stay float32.
          rngs: ``nnx.Rngs``, or a model's ``KernelInitializer`` (the kernel is then written by its
            ``finalize()``). Not stored.
        """
        if in_features % groups or out_features % groups:
            raise ValueError(f"groups={groups} must divide in ({in_features}) and out ({out_features})")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.dtype = dtype
        shape = (*self.kernel_size, in_features // groups, out_features)
        std = kaiming_std(shape, init_mode)
        if isinstance(rngs, KernelInitializer):
            self.kernel = nnx.Param(rngs.placeholder(shape))
            rngs.register(self.kernel, std)
        else:
            self.kernel = nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) * std)
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None

    def _convolve(self, x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=self.stride,
            padding=tuple((p, p) for p in self.padding),
            rhs_dilation=self.dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )

    def _add_bias(self, y: jax.Array, channels: slice = slice(None)) -> jax.Array:
        return y if self.bias is None else y + self.bias[...][channels].astype(self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._add_bias(self._convolve(x, self.kernel[...], self.groups))

    def call_block_diagonal(self, x: jax.Array) -> jax.Array:
        """``__call__`` of a grouped convolution as one dense convolution whose kernel is block-diagonal.

        Twice the arithmetic for two groups, but one plain convolution (no per-group channel slicing in the
        convolution library); the gradient reaches only the kernel's own blocks.
        """
        if self.groups == 1:
            return self(x)
        kernel = self.kernel[...]
        group_in, group_out = self.in_features // self.groups, self.out_features // self.groups
        dense = jnp.zeros((*self.kernel_size, self.in_features, self.out_features), kernel.dtype)
        for group in range(self.groups):
            dense = jax.lax.dynamic_update_slice(
                dense,
                kernel[..., group * group_out : (group + 1) * group_out],
                (0, 0, group * group_in, group * group_out),
            )
        return self._add_bias(self._convolve(x, dense, 1))

    def call_groups(self, parts: Sequence[jax.Array]) -> list[jax.Array]:
        """``__call__`` of a grouped convolution as one plain convolution per group.

        Args:
          parts: the input of each group (group ``g`` reads input channels ``[g * in/groups, (g + 1) * in/groups)``).

        Returns:
          Each group's output (``out/groups`` channels each); their concatenation is ``__call__`` of the
          concatenated input.
        """
        if len(parts) != self.groups:
            raise ValueError(f"call_groups needs {self.groups} inputs, got {len(parts)}")
        group_out = self.out_features // self.groups
        kernel = self.kernel[...]
        outputs = []
        for group, part in enumerate(parts):
            channels = slice(group * group_out, (group + 1) * group_out)
            outputs.append(self._add_bias(self._convolve(part, kernel[..., channels], 1), channels))
        return outputs


class BatchNorm(nnx.Module):
    """``torch.nn.BatchNorm2d`` for NHWC inputs, with three training behaviours.

    Modes:
      * ``global``: in training, statistics over the whole (global) batch and all spatial positions. Under
        ``jax.jit`` with a batch sharded over devices this is synchronised BN.
      * ``per_replica``: in training, the batch is cut into consecutive groups of ``group_size`` images and each
        group is normalised with its own statistics. This reproduces ``nn.DataParallel`` with unsynchronised BN
        (the authors' setting: 4 GPUs, 8 images each). The running statistics are updated with the mean over
        groups of the group means and of the unbiased group variances.
      * ``frozen``: always normalises with the running statistics (the authors' ``FixedBatchNorm``); ``scale``
        and ``bias`` stay trainable parameters and the running statistics never change.

    Training versus evaluation is the ``use_running_average`` attribute, which ``model.train()`` /
    ``model.eval()`` (``nnx.Module.set_attributes``) and ``nnx.view`` switch. In evaluation every mode uses the
    running statistics.

    Variables: ``scale`` and ``bias`` (``nnx.Param``), ``mean`` and ``var`` (``nnx.BatchStat``), all float32.
    Statistics are reduced in float32 (float64 for float64 inputs), whatever the compute ``dtype``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        mode: str = "global",
        group_size: int | None = None,
        momentum: float = 0.1,
        epsilon: float = 1e-5,
        use_running_average: bool = False,
        statistics: str = "two_pass",
        dtype=jnp.float32,
    ):
        """Creates the layer.

        Args:
          num_features: channels (last axis).
          mode: one of ``BN_MODES``.
          group_size: images per statistics group, required for (and only used by) ``per_replica``.
          momentum: torch momentum: ``running = (1 - momentum) * running + momentum * batch``.
          epsilon: added to the variance.
          use_running_average: start in evaluation (True) or training (False) behaviour.
          statistics: one of ``BN_STATISTICS``: how a training batch's mean and variance are computed.
          dtype: dtype of the output.
        """
        if mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {mode!r}")
        if mode == "per_replica" and (group_size is None or group_size < 1):
            raise ValueError(
                f"bn_group_size must be a positive int when bn_mode='per_replica', got {group_size!r}"
            )
        if statistics not in BN_STATISTICS:
            raise ValueError(f"bn_statistics must be one of {BN_STATISTICS}, got {statistics!r}")
        self.num_features = num_features
        self.mode = mode
        self.group_size = group_size if mode == "per_replica" else None
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = use_running_average
        self.statistics = statistics
        self.dtype = dtype
        # From numpy: eager jnp.ones/zeros would compile a fill kernel per distinct width.
        ones, zeros = np.ones((num_features,), np.float32), np.zeros((num_features,), np.float32)
        self.scale = nnx.Param(jnp.asarray(ones))
        self.bias = nnx.Param(jnp.asarray(zeros))
        self.mean = nnx.BatchStat(jnp.asarray(zeros))
        self.var = nnx.BatchStat(jnp.asarray(ones))

    def set_view(self, use_running_average: bool | None = None):
        """Hook for ``nnx.view``: switches between training and evaluation behaviour."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def _normalize(self, x, mean, var, channels: slice):
        # Everything in x's precision (float32 variables would otherwise cap a float64 computation).
        dtype = x.dtype
        return _scale_and_shift(
            x,
            mean.astype(dtype),
            jax.lax.rsqrt(var.astype(dtype) + self.epsilon),
            self.scale[...][channels].astype(dtype),
            self.bias[...][channels].astype(dtype),
        )

    def _normalize_groups(self, groups: jax.Array, channels: slice) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Each group (axis 0) normalised with its statistics over everything but the group and channel axes;
        returns (normalised, mean, biased variance) in the statistics dtype."""
        if self.statistics == "one_pass":
            dtype = _statistics_dtype(groups.dtype)
            scale, bias = (variable[...][channels].astype(dtype) for variable in (self.scale, self.bias))
            return _batch_norm_one_pass(groups, scale, bias, self.epsilon)
        groups = groups.astype(_statistics_dtype(groups.dtype))
        axes = tuple(range(1, groups.ndim - 1))
        mean = jnp.mean(groups, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(groups - mean), axis=axes, keepdims=True)
        return self._normalize(groups, mean, var, channels), mean, var

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises ``x`` of shape (B, ..., C); updates the running statistics when training."""
        return self.call_channel_parts([x])[0]

    def call_channel_parts(self, parts: Sequence[jax.Array]) -> list[jax.Array]:
        """``__call__`` of the channel-wise concatenation of ``parts``, without building it.

        Args:
          parts: arrays of one shape but the last axis, whose channels, concatenated in order, are this layer's.

        Returns:
          Each part normalised with its own channels' statistics and parameters; in training, the running
          statistics of all channels are updated, as one call on the concatenation would.
        """
        widths = [part.shape[-1] for part in parts]
        if sum(widths) != self.num_features:
            raise ValueError(f"BatchNorm of {self.num_features} channels got parts of {widths} channels")
        offsets = np.cumsum([0, *widths])
        channel_slices = [slice(int(start), int(stop)) for start, stop in zip(offsets[:-1], offsets[1:], strict=True)]
        if self.mode == "frozen" or self.use_running_average:
            return [
                self._normalize(
                    part.astype(_statistics_dtype(part.dtype)), self.mean[...][channels], self.var[...][channels],
                    channels,
                ).astype(self.dtype)
                for part, channels in zip(parts, channel_slices, strict=True)
            ]

        outputs, batch_means, batch_vars = [], [], []
        for part, channels in zip(parts, channel_slices, strict=True):
            if self.mode == "global":
                groups = part[None]
            else:
                batch = part.shape[0]
                if batch % self.group_size:
                    raise ValueError(
                        f"per_replica BatchNorm: batch size {batch} is not a multiple of "
                        f"bn_group_size={self.group_size}"
                    )
                groups = part.reshape((batch // self.group_size, self.group_size) + part.shape[1:])
            normalized, group_mean, group_var = self._normalize_groups(groups, channels)
            # The running statistics take no gradient.
            group_mean, group_var = jax.lax.stop_gradient(group_mean), jax.lax.stop_gradient(group_var)
            outputs.append(normalized.reshape(part.shape).astype(self.dtype))
            # torch updates the running variance with the unbiased estimate (count / (count - 1)).
            count = math.prod(groups.shape[1:-1])
            width = part.shape[-1]
            batch_means.append(jnp.mean(group_mean.reshape(-1, width), axis=0))
            batch_vars.append(jnp.mean(group_var.reshape(-1, width), axis=0) * (count / max(count - 1, 1)))
        batch_mean = batch_means[0] if len(parts) == 1 else jnp.concatenate(batch_means)
        batch_var = batch_vars[0] if len(parts) == 1 else jnp.concatenate(batch_vars)
        momentum = self.momentum
        new_mean = (1.0 - momentum) * self.mean[...] + momentum * batch_mean
        new_var = (1.0 - momentum) * self.var[...] + momentum * batch_var
        # set_value, not ``self.mean[...] = ...``: the indexed form probes the tracer's sharding, which under
        # jit costs time proportional to the whole trace, for every BN layer (quadratic tracing). The stored
        # statistics stay float32 whatever the compute precision.
        self.mean.set_value(new_mean.astype(self.mean[...].dtype))
        self.var.set_value(new_var.astype(self.var[...].dtype))
        return outputs


class ReLU(nnx.Module):
    """Parameter-free ReLU, a placeholder that keeps torch ``nn.Sequential`` indices aligned."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


def _pool_geometry(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> tuple[int, int]:
    """Returns (output size, extra right padding) as torch computes them for one spatial axis."""
    span = size + 2 * padding - kernel
    if span < 0:
        raise ValueError(f"pooling window {kernel} larger than padded input {size + 2 * padding}")
    if ceil_mode:
        out = -(-span // stride) + 1
        # torch: the last window must start inside the input or the left padding.
        if (out - 1) * stride >= size + padding:
            out -= 1
    else:
        out = span // stride + 1
    extra = max((out - 1) * stride + kernel - (size + 2 * padding), 0)
    return out, extra


def _window_padding(shape, kernel, stride, padding, ceil_mode):
    pads = []
    for axis in range(2):
        _, extra = _pool_geometry(shape[1 + axis], kernel[axis], stride[axis], padding[axis], ceil_mode)
        pads.append((padding[axis], padding[axis] + extra))
    return pads


def _window_sum_2d(array: np.ndarray, kernel, strides) -> np.ndarray:
    """Sums of ``kernel`` windows of a 2-D numpy array taken with ``strides`` (no padding)."""
    out_h = (array.shape[0] - kernel[0]) // strides[0] + 1
    out_w = (array.shape[1] - kernel[1]) // strides[1] + 1
    sums = np.zeros((out_h, out_w), array.dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            sums += array[i : i + strides[0] * out_h : strides[0], j : j + strides[1] * out_w : strides[1]]
    return sums


def max_pool2d(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    ceil_mode: bool = False,
) -> jax.Array:
    """``torch.nn.functional.max_pool2d`` on NHWC: pads with -inf, so padding never wins the max."""
    kernel = _pair(kernel_size)
    strides = _pair(stride if stride is not None else kernel_size)
    pads = _window_padding(x.shape, kernel, strides, _pair(padding), ceil_mode)
    return jax.lax.reduce_window(
        x,
        -jnp.inf,  # A Python scalar: JAX then recognises the max monoid and can differentiate the pool.
        jax.lax.max,
        (1, *kernel, 1),
        (1, *strides, 1),
        ((0, 0), *pads, (0, 0)),
    )


def avg_pool2d(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> jax.Array:
    """``torch.nn.functional.avg_pool2d`` on NHWC.

    The divisor follows torch: with ``count_include_pad`` the explicit zero padding counts but the extra
    overhang that ``ceil_mode`` adds past it does not; without it only real input positions count.
    """
    kernel = _pair(kernel_size)
    strides = _pair(stride if stride is not None else kernel_size)
    padding = _pair(padding)
    if kernel == (1, 1) and strides == (1, 1) and padding == (0, 0):
        return x
    pads = _window_padding(x.shape, kernel, strides, padding, ceil_mode)
    window = (1, *kernel, 1)
    window_strides = (1, *strides, 1)
    full_pads = ((0, 0), *pads, (0, 0))
    # A concrete (numpy) init value: a traced one makes reduce_window fall back to its generic form, which has
    # no gradient ("Linearization failed").
    zero = np.array(0, x.dtype)
    total = jax.lax.reduce_window(x, zero, jax.lax.add, window, window_strides, full_pads)

    # The divisor depends on the shapes only: count, with the same windows, the positions torch counts.
    height, width = x.shape[1], x.shape[2]
    if count_include_pad:
        mask = np.ones((height + 2 * padding[0], width + 2 * padding[1]), np.float32)
        mask_pads = ((0, pads[0][1] - padding[0]), (0, pads[1][1] - padding[1]))
    else:
        mask = np.ones((height, width), np.float32)
        mask_pads = tuple(pads)
    count = _window_sum_2d(np.pad(mask, mask_pads), kernel, strides)
    return (total / jnp.asarray(count[None, :, :, None], x.dtype)).astype(x.dtype)


class MaxPool2d(nnx.Module):
    """Parameter-free ``nn.MaxPool2d`` (NHWC)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.padding = _pair(padding)
        self.ceil_mode = ceil_mode

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)


class AvgPool2d(nnx.Module):
    """Parameter-free ``nn.AvgPool2d`` (NHWC)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.padding = _pair(padding)
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad

    def __call__(self, x: jax.Array) -> jax.Array:
        return avg_pool2d(
            x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad
        )


def apply_sequential(layers: nnx.List, x: jax.Array) -> jax.Array:
    """Applies the modules of an ``nnx.List`` in order, like a torch ``nn.Sequential``."""
    for layer in layers:
        x = layer(x)
    return x


def call_block(block: nnx.Module, x: jax.Array, remat: bool) -> jax.Array:
    """Calls a residual block, under ``nnx.remat`` (activation recomputation) when ``remat`` is set."""
    if remat:
        return nnx.remat(lambda module, inputs: module(inputs))(block, x)
    return block(x)


def _align_corners_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one axis, the two source indices and the weight of the upper one of every output position, as torch's
    ``align_corners=True`` bilinear computes them: source = i * (in - 1) / (out - 1) (0 when ``out`` is 1), lower
    = floor(source), upper = lower + 1 clamped to the last index."""
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    source = np.arange(out_size, dtype=np.float64) * scale
    lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, source - lower


def _resize_axis_align_corners(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    in_size = x.shape[axis]
    if in_size == out_size:
        # The map is the identity there (source = i exactly), as in torch.
        return x
    lower, upper, weight = _align_corners_taps(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    weight = jnp.asarray(weight.reshape(shape), x.dtype)
    low = jnp.take(x, jnp.asarray(lower), axis=axis)
    high = jnp.take(x, jnp.asarray(upper), axis=axis)
    return low * (1 - weight) + high * weight


def resize_bilinear_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """``torch.nn.functional.interpolate(x, size, mode="bilinear", align_corners=True)`` for an NHWC batch.

    The corner pixels of input and output coincide: output row i samples input row i * (H - 1) / (h - 1), and an
    output side of 1 samples the first row or column (torch's rule); an input side of 1 is broadcast. Both axes are
    resized separably, which is the same bilinear interpolation. The sizes are static, so it is jit-friendly, and it
    is differentiable (a gather and a blend). Inputs narrower than float32 are blended in float32 and cast back, so
    the interpolation weights are not rounded to bfloat16.

    Args:
      x: (B, H, W, C) array.
      size: the output ``(height, width)``, positive ints.

    Returns:
      (B, height, width, C) array of ``x``'s dtype.
    """
    height, width = (int(side) for side in size)
    if height < 1 or width < 1:
        raise ValueError(f"resize_bilinear_align_corners: output size must be positive, got {tuple(size)}")
    if x.ndim != 4:
        raise ValueError(f"resize_bilinear_align_corners expects an NHWC array, got shape {x.shape}")
    dtype = x.dtype
    y = x.astype(jnp.promote_types(dtype, jnp.float32))
    y = _resize_axis_align_corners(y, 1, height)
    y = _resize_axis_align_corners(y, 2, width)
    return y.astype(dtype)
