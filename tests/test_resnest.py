"""Tests for puzzle_jax.models.resnest: parity with the official ``resnest`` 0.0.5 package."""


import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch_reference import (
    assert_backbone_parity,
    converted_backbone,
    random_images,
    torch_parameter_count,
    torch_resnest,
)

from puzzle_jax.models import create_backbone

STAGES = ("stage1", "stage2", "stage3", "stage4", "stage5")
# Odd, non-square sizes on purpose: the avg_down shortcut pools with ceil_mode=True and excludes padding,
# which only matters when a stage has an odd size. 72x88 -> stage3 9x11 -> stage4 5x6 (OS16); 40x56 ->
# stage3 5x7 -> stage4 3x4. The float64 check uses the top-left square crop of the smaller side.
FINAL_SIZES = {
    (72, 88): {32: (3, 3), 16: (5, 6), 8: (9, 11)},
    (40, 56): {32: (2, 2), 16: (3, 4), 8: (5, 7)},
}


def _check(arch, output_stride, size, train_float32=False, float64=True, **options):
    height, width = size
    reference = torch_resnest(arch, output_stride)
    images = random_images(batch=4, size=max(size))[:, :height, :width]

    def create_model(dtype):
        return converted_backbone(arch, reference, output_stride, dtype, **options)

    shapes = nnx.eval_shape(lambda module, batch: module(batch), create_model(jnp.float32), jnp.asarray(images))
    final = FINAL_SIZES[size][output_stride]
    assert shapes["stage5"].shape == (4, *final, 2048)
    assert shapes["stage4"].shape[1:3] == FINAL_SIZES[size][min(output_stride, 16)]

    errors = assert_backbone_parity(
        create_model, reference, images, train_float32=train_float32, float64=float64, float64_size=height
    )
    print(f"{arch} OS{output_stride} relative errors: {errors}")


@pytest.mark.slow
@pytest.mark.parametrize("output_stride", [16, 8, 32])
def test_resnest50_matches_official(output_stride):
    # OS32 differs from OS16 only in geometry, which the (well-conditioned) float32 eval check covers.
    _check(
        "resnest50", output_stride, (72, 88), train_float32=output_stride == 16, float64=output_stride != 32
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "grouped_conv,bn_statistics", [("split", "one_pass"), ("block_diagonal", "two_pass"), ("grouped", "one_pass")]
)
def test_the_faster_programs_match_official(grouped_conv, bn_statistics):
    """The grouped-convolution and BatchNorm-statistics programs compute the official network: float32 eval,
    float32 train as accurate as torch's own, float64 train exact (stage outputs and every BN statistic)."""
    _check(
        "resnest50", 16, (40, 56), train_float32=True, grouped_conv=grouped_conv, bn_statistics=bn_statistics
    )


@pytest.mark.slow
@pytest.mark.parametrize("output_stride", [16, 8])
def test_resnest101_matches_official(output_stride):
    # Smaller images: torch's dilated grouped convolutions are slow on CPU, in float64 even more.
    _check("resnest101", output_stride, (40, 56))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnest200", "resnest269"])
def test_deep_resnest_parameter_count_and_forward(arch):
    model = create_backbone(arch, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert sum(v.size for _, v in nnx.to_flat_state(params)) == torch_parameter_count(arch)
    model.eval()
    # The ResNeSt-101 tests' input shape: its per-operation compilations are cached by then.
    outputs = model(jnp.asarray(random_images(batch=4, size=56)[:, :40, :56]))
    assert outputs["stage1"].shape == (4, 10, 14, 128)
    assert outputs["stage5"].shape == (4, 3, 4, 2048)
    assert all(bool(jnp.isfinite(outputs[name]).all()) for name in STAGES)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnest200", "resnest269"])
def test_deep_resnest_matches_official_in_float64(arch):
    """Exact semantics of the deep networks (float64 both sides). In float32 a random-weight ResNeSt-269
    is ill-conditioned: torch's own float32 and float64 runs differ by ~4e-4 at stage4."""
    import jax
    from torch_reference import relative_error, torch_stages

    reference = torch_resnest(arch, 16).double()
    images = random_images(batch=1, size=40).astype(np.float64)
    expected = torch_stages(reference, images)
    with jax.enable_x64(True):
        model = converted_backbone(arch, reference, 16, jnp.float64)
        stats = nnx.state(model, nnx.BatchStat)
        nnx.update(model, jax.tree.map(lambda value: jnp.asarray(value, jnp.float64), stats))
        model.eval()
        outputs = model(jnp.asarray(images))
        errors = {name: relative_error(outputs[name], expected[name]) for name in STAGES}
    print(f"{arch} OS16 float64 eval relative errors: {errors}")
    assert max(errors.values()) < 1e-9
