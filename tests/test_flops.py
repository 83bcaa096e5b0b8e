"""Tests of ``benchmarks.flops``: closed-form FLOPs of convolutions, matmuls and nested jaxprs, and XLA:CPU's count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from benchmarks import flops

NHWC = ("NHWC", "HWIO", "NHWC")


def _spec(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _conv(x, w, stride=1, padding="SAME", groups=1, dilation=1):
    return lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        padding,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=NHWC,
        feature_group_count=groups,
    )


def _textbook_conv_flops(n, ho, wo, cout, kh, kw, cin_per_group):
    return 2 * n * ho * wo * cout * kh * kw * cin_per_group


@pytest.mark.parametrize(
    "size, kernel, padding",
    [(8, 2, "SAME"), (9, 3, "VALID")],
    ids=["same-without-padding", "valid"],
)
def test_strided_convolution_without_padding_is_the_textbook_count(size, kernel, padding):
    """Stride 2, no tap on padding (SAME pads nothing for a 2x2 kernel on an even size): 2 N Ho Wo Cout kh kw Cin."""
    n, cin, cout = 2, 4, 6
    count = flops.count_flops(
        lambda x, w: _conv(x, w, stride=2, padding=padding), _spec(n, size, size, cin), _spec(kernel, kernel, cin, cout)
    )
    ho = 4  # 8 / 2 for SAME; (9 - 3) / 2 + 1 for VALID
    assert count.total == _textbook_conv_flops(n, ho, ho, cout, kernel, kernel, cin)
    assert dict(count.by_primitive) == {"conv_general_dilated": count.total}


def test_strided_same_convolution_leaves_out_the_taps_on_padding():
    """3x3, stride 2, SAME on 8x8: XLA pads one row/column at the end, where exactly one (output, tap) pair per axis
    lands (output 3, tap 2 reads index 8), so each axis has Ho x kh - 1 = 11 real pairs instead of 12."""
    n, size, cin, cout, kernel, ho = 2, 8, 4, 6, 3, 4
    count = flops.count_flops(
        lambda x, w: _conv(x, w, stride=2), _spec(n, size, size, cin), _spec(kernel, kernel, cin, cout)
    )
    textbook = _textbook_conv_flops(n, ho, ho, cout, kernel, kernel, cin)
    assert count.total == textbook * (ho * kernel - 1) ** 2 // (ho * kernel) ** 2
    assert count.total == 2 * n * cout * cin * 11 * 11


def test_grouped_convolution_sums_over_the_input_features_of_its_group():
    n, size, cin, cout, kernel, groups = 2, 8, 4, 6, 3, 2
    count = flops.count_flops(
        lambda x, w: _conv(x, w, padding="VALID", groups=groups),
        _spec(n, size, size, cin),
        _spec(kernel, kernel, cin // groups, cout),
    )
    assert count.total == _textbook_conv_flops(n, 6, 6, cout, kernel, kernel, cin // groups)


def test_dilated_convolution_counts_taps_on_real_input():
    """3x3 with dilation 2 and padding 2 on 8 positions: taps at offsets -2, 0, +2 have 6, 8, 6 real outputs."""
    n, size, cin, cout = 1, 8, 3, 5
    count = flops.count_flops(
        lambda x, w: _conv(x, w, padding=((2, 2), (2, 2)), dilation=2),
        _spec(n, size, size, cin),
        _spec(3, 3, cin, cout),
    )
    assert count.total == 2 * n * cout * cin * (6 + 8 + 6) ** 2


def test_batch_grouped_convolution_counts_one_batch_group_per_output_feature():
    """batch_group_count=2 splits the 4 input batch elements into 2 groups: output batch 2, and each output feature
    sums over one group's batch elements, i.e. 2 x (N / 2) x Ho x Wo x Cout x kh x kw x Cin."""
    n, size, cin, cout, kernel = 4, 6, 3, 4, 3
    count = flops.count_flops(
        lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=NHWC, batch_group_count=2),
        _spec(n, size, size, cin),
        _spec(kernel, kernel, cin, cout),
    )
    assert count.total == _textbook_conv_flops(n // 2, 4, 4, cout, kernel, kernel, cin)


def test_dense_layer_is_two_m_n_k():
    m, k, n = 5, 7, 3
    count = flops.count_flops(lambda x, w, b: jnp.tanh(x @ w + b), _spec(m, k), _spec(k, n), _spec(n))
    assert count.total == 2 * m * n * k
    assert dict(count.by_primitive) == {"dot_general": 2 * m * n * k}


def test_batched_dot_general_multiplies_the_batch_dimensions():
    """Attention scores: batch b x heads h, queries q x keys s, contracted over d."""
    b, h, q, s, d = 2, 3, 4, 5, 6
    count = flops.count_flops(
        lambda queries, keys: jnp.einsum("bhqd,bhsd->bhqs", queries, keys), _spec(b, h, q, d), _spec(b, h, s, d)
    )
    assert count.total == 2 * b * h * q * s * d


def _convolution_params(fn, *args):
    """The params of every convolution in the jaxpr of ``fn`` (to check which kinds a test exercises)."""
    return [e.params for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive.name == "conv_general_dilated"]


@pytest.mark.parametrize(
    "stride, groups, dilation",
    [(2, 1, 1), (2, 2, 1), (1, 1, 2)],
    ids=["strided", "strided-grouped", "dilated"],
)
def test_input_and_kernel_gradients_each_cost_one_forward(stride, groups, dilation):
    """Every forward multiply-add x*w has one counterpart in each gradient, so forward + both gradients = 3 forwards;
    this holds only when the transposed (lhs-dilated) input gradient counts no dilation holes and the padding is
    treated alike in all three convolutions."""
    n, size, cin, cout, kernel = 2, 8, 4, 6, 3
    x, w = _spec(n, size, size, cin), _spec(kernel, kernel, cin // groups, cout)

    def forward(x, w):
        return _conv(x, w, stride=stride, groups=groups, dilation=dilation)

    def loss(x, w):
        return jnp.sum(forward(x, w))

    def forward_and_gradients(x, w):
        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    forward_flops = flops.count_flops(forward, x, w).total
    assert flops.count_flops(forward_and_gradients, x, w).total == 3 * forward_flops
    params = _convolution_params(forward_and_gradients, x, w)
    assert len(params) == 3
    if stride > 1:  # the input gradient is a transposed convolution
        assert any(max(p["lhs_dilation"]) == stride for p in params)
    if groups > 1:  # the kernel gradient of a grouped convolution groups its batch
        assert any(p["batch_group_count"] == groups for p in params)


def _small_convolution_flops():
    """A 3x3 SAME convolution of (1, 6, 6, 2) into 4 features at stride 1: 6 x 3 - 2 = 16 real pairs per axis."""
    return 2 * 1 * 4 * 2 * 16 * 16


def _small_convolution(x, w):
    return jnp.tanh(_conv(x, w))


_SMALL_ARGS = (_spec(1, 6, 6, 2), _spec(3, 3, 2, 4))


def test_jit_and_checkpoint_count_their_body_once():
    for wrapped in (
        jax.jit(_small_convolution),
        jax.checkpoint(_small_convolution),
        jax.jit(jax.jit(_small_convolution)),
    ):
        assert flops.count_flops(wrapped, *_SMALL_ARGS).total == _small_convolution_flops()


def test_scan_multiplies_its_body_by_its_length():
    def three_steps(x, w):
        def step(carry, _):
            return _small_convolution(carry, w)[..., :2], None

        return lax.scan(step, x, None, length=3)[0]

    assert flops.count_flops(three_steps, *_SMALL_ARGS).total == 3 * _small_convolution_flops()


def test_while_counts_its_body_once_and_cond_its_most_expensive_branch():
    m = 4
    matmul_flops = 2 * m * m * m

    def loop(x):
        return lax.while_loop(lambda carry: carry[0] < 5, lambda carry: (carry[0] + 1, carry[1] @ carry[1]), (0, x))[1]

    def branches(pick, x):
        return lax.cond(pick, lambda x: x @ x @ x, lambda x: x + 1, x)

    assert flops.count_flops(loop, _spec(m, m)).total == matmul_flops
    assert flops.count_flops(branches, jax.ShapeDtypeStruct((), jnp.bool_), _spec(m, m)).total == 2 * matmul_flops


def test_custom_vjp_function_counts_its_primal_computation():
    @jax.custom_vjp
    def square(x):
        return x @ x

    square.defvjp(lambda x: (x @ x, x), lambda x, g: (g @ x.T + x.T @ g,))
    m = 3
    assert flops.count_flops(square, _spec(m, m)).total == 2 * m**3
    # Differentiated, the forward rule and the backward rule run: 1 + 2 matmuls.
    assert flops.count_flops(jax.grad(lambda x: jnp.sum(square(x))), _spec(m, m)).total == 3 * 2 * m**3


def test_shard_map_counts_every_shard():
    """Two shards of a (8, 4) @ (4, 3) product each see (4, 4) @ (4, 3); together the global product."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
    assert flops.count_flops(sharded, _spec(8, 4), _spec(4, 3)).total == 2 * 8 * 4 * 3


def test_keyword_arguments_and_a_traced_jaxpr_give_the_same_count():
    m, k, n = 2, 3, 4
    expected = 2 * m * k * n
    assert flops.count_flops(lambda x, *, w: x @ w, _spec(m, k), w=_spec(k, n)).total == expected
    traced = jax.jit(lambda x, w: x @ w).trace(_spec(m, k), _spec(k, n))
    assert flops.count_jaxpr_flops(traced.jaxpr).total == expected
    assert flops.count_jaxpr_flops(traced.jaxpr.jaxpr).total == expected


def _xla_cpu_flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize(
    "conv",
    [
        lambda x, w: _conv(x, w, stride=2),
        lambda x, w: _conv(x, w, padding=((2, 2), (2, 2)), dilation=2),
        lambda x, w: lax.conv_general_dilated(
            x, w, (1, 1), ((2, 1), (2, 1)), lhs_dilation=(2, 2), dimension_numbers=NHWC
        ),
        lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC, batch_group_count=2),
    ],
    ids=["strided-same", "dilated", "transposed", "batch-grouped"],
)
def test_a_single_convolution_counts_what_xla_cpu_counts(conv):
    """The documented convention is XLA's: with nothing but the convolution, the two counts are equal."""
    x, w = _spec(2, 7, 7, 4), _spec(3, 3, 4, 6)
    assert flops.count_flops(conv, x, w).total == _xla_cpu_flops(conv, x, w)


def test_a_small_conv_net_agrees_with_xla_cpu_within_its_elementwise_work():
    """Two convolutions and a dense layer. XLA:CPU also counts the bias adds and ReLUs (about 1% here), which the
    model-FLOP convention leaves out: the counter is a little lower, by less than 5%."""
    keys = jax.random.split(jax.random.key(0), 3)
    params = {
        "conv1": jax.random.normal(keys[0], (3, 3, 8, 16)) * 0.1,
        "conv2": jax.random.normal(keys[1], (3, 3, 16, 32)) * 0.1,
        "dense": jax.random.normal(keys[2], (8 * 8 * 32, 10)) * 0.01,
    }

    def net(params, images):
        hidden = jax.nn.relu(_conv(images, params["conv1"]) + 0.1)
        hidden = jax.nn.relu(_conv(hidden, params["conv2"], stride=2) + 0.1)
        return hidden.reshape(hidden.shape[0], -1) @ params["dense"]

    images = _spec(2, 16, 16, 8)
    counted = flops.count_flops(net, params, images).total
    xla = _xla_cpu_flops(net, params, images)
    assert counted <= xla
    assert (xla - counted) / xla < 0.05, (counted, xla)
