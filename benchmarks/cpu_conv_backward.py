"""Why our training step is slower than PyTorch's on a CPU: convolution gradients, layer by layer.

Times, single-threaded, the forward convolution, the gradient with respect to the input and the
gradient with respect to the kernel of a few ResNet-50 layers (at the shapes of a 224x224 input,
batch 2), in JAX (XLA:CPU, NHWC/HWIO) and in PyTorch (oneDNN, NCHW), and prints the JAX/PyTorch time
ratio of each (> 1: JAX is slower). Then the whole ResNet-50 classifier (ours and the PyTorch
reference of ``benchmarks.authors_torch``): forward only, and forward + backward, so the backward pass's
share of the gap shows.

    cd <repository root> && nice -n 10 python benchmarks/cpu_conv_backward.py
"""

from __future__ import annotations

import os
import sys
import time

# One thread in both frameworks: on a shared machine PyTorch's OpenMP threads stall when a core is
# taken away, and XLA:CPU's only thread control is to switch its Eigen pool off.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The repository root, so that ``puzzle_jax`` and ``benchmarks`` import when this file is run as a script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import torch

torch.set_num_threads(1)

# (name, batch, height, width, in channels, out channels, kernel, stride)
LAYERS = (
    ("stem 7x7/2", 2, 224, 224, 3, 64, 7, 2),
    ("layer1 3x3", 2, 56, 56, 64, 64, 3, 1),
    ("layer2 3x3/2", 2, 56, 56, 128, 128, 3, 2),
    ("layer2 down 1x1/2", 2, 56, 56, 256, 512, 1, 2),
    ("layer2 1x1", 2, 28, 28, 512, 128, 1, 1),
    ("layer3 3x3", 2, 14, 14, 256, 256, 3, 1),
    ("layer4 1x1 (OS16)", 2, 14, 14, 2048, 512, 1, 1),
)


def _best_time(function, repeats: int = 5) -> float:
    function()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def _jax_times(batch, height, width, cin, cout, kernel, stride):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, height, width, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout), np.float32))
    pad = kernel // 2

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x,
            w,
            (stride, stride),
            ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    y = conv(x, w)
    cotangent = jnp.ones_like(y)
    forward = jax.jit(conv)
    input_grad = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    kernel_grad = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return (
        _best_time(lambda: forward(x, w).block_until_ready()),
        _best_time(lambda: input_grad(x, w, cotangent).block_until_ready()),
        _best_time(lambda: kernel_grad(x, w, cotangent).block_until_ready()),
    )


def _torch_times(batch, height, width, cin, cout, kernel, stride):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, height, width, generator=generator)
    w = torch.randn(cout, cin, kernel, kernel, generator=generator)
    pad = kernel // 2
    y = torch.nn.functional.conv2d(x, w, stride=stride, padding=pad)
    cotangent = torch.ones_like(y)

    def backward(mask):
        # The kernel autograd calls, asked for one gradient at a time.
        return torch.ops.aten.convolution_backward(
            cotangent, x, w, None, [stride, stride], [pad, pad], [1, 1], False, [0, 0], 1, mask
        )

    with torch.no_grad():
        return (
            _best_time(lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=pad)),
            _best_time(lambda: backward([True, False, False])),
            _best_time(lambda: backward([False, True, False])),
        )


def main() -> None:
    print(
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}; "
        "one thread each; "
        "best of 5, milliseconds; ratio = JAX time / PyTorch time"
    )
    header = (
        f"{'layer':<20}{'fwd jax':>9}{'torch':>8}{'ratio':>7}{'dx jax':>9}{'torch':>8}{'ratio':>7}"
    )
    header += f"{'dw jax':>9}{'torch':>8}{'ratio':>7}"
    print(header)
    totals = np.zeros((2, 3))
    for name, *shape in LAYERS:
        jax_times = np.array(_jax_times(*shape))
        torch_times = np.array(_torch_times(*shape))
        totals += [jax_times, torch_times]
        cells = "".join(
            f"{1000 * j:9.1f}{1000 * t:8.1f}{j / t:7.2f}"
            for j, t in zip(jax_times, torch_times, strict=True)
        )
        print(f"{name:<20}{cells}")
    cells = "".join(
        f"{1000 * j:9.1f}{1000 * t:8.1f}{j / t:7.2f}" for j, t in zip(*totals, strict=True)
    )
    print(f"{'sum':<20}{cells}")
    _compare_whole_network()


def _compare_whole_network(batch: int = 2, size: int = 224) -> None:
    """ResNet-50 classifier, BatchNorm in training mode: forward, and forward + backward."""
    from flax import nnx

    from benchmarks import authors_torch
    from puzzle_jax import losses, models, training

    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
    labels = (rng.random((batch, 20)) < 0.2).astype(np.float32)
    model = models.create_classifier("resnet50", 20, bn_mode="global", rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, batch_stats = training.split_model(model)

    def loss_of(params, images):
        logits, _ = nnx.merge(graphdef, params, batch_stats)(images)
        return losses.multilabel_soft_margin_loss(logits, jnp.asarray(labels))

    x = jnp.asarray(images)
    forward, gradient = jax.jit(loss_of), jax.jit(jax.grad(loss_of))
    jax_forward = _best_time(lambda: forward(params, x).block_until_ready(), 3)
    jax_both = _best_time(lambda: jax.block_until_ready(gradient(params, x)), 3)

    reference = authors_torch.create_classifier("resnet50", 20).train()
    torch_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    torch_labels = torch.from_numpy(labels)

    def torch_loss():
        logits, _ = reference(torch_images)
        return torch.nn.functional.multilabel_soft_margin_loss(logits, torch_labels)

    def torch_forward():
        with torch.no_grad():
            torch_loss()

    def torch_both():
        reference.zero_grad(set_to_none=True)
        torch_loss().backward()

    torch_forward_time = _best_time(torch_forward, 3)
    torch_both_time = _best_time(torch_both, 3)
    print(f"\nResNet-50 classifier, batch {batch}, {size}x{size}, best of 3, seconds")
    for name, jax_time, torch_time in (
        ("forward", jax_forward, torch_forward_time),
        ("forward + backward", jax_both, torch_both_time),
        ("backward (difference)", jax_both - jax_forward, torch_both_time - torch_forward_time),
    ):
        ratio = jax_time / torch_time
        print(f"{name:<24}jax {jax_time:6.2f}  torch {torch_time:6.2f}  ratio {ratio:5.2f}")


if __name__ == "__main__":
    main()
