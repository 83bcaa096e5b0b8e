"""Tests of puzzle_jax.losses against direct torch transcriptions of spec §3 (NCHW)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from puzzle_jax import losses

BATCH, HEIGHT, WIDTH, CLASSES = 4, 5, 6, 20


def _random_case(seed):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((BATCH, HEIGHT, WIDTH, CLASSES)).astype(np.float32)
    reconstructed = rng.standard_normal((BATCH, HEIGHT, WIDTH, CLASSES)).astype(np.float32)
    labels = (rng.random((BATCH, CLASSES)) < 0.2).astype(np.float32)
    labels[:, seed % CLASSES] = 1.0  # every sample has at least one class
    return features, reconstructed, labels


def _to_nchw_torch(array):
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2))).requires_grad_(True)


def _torch_re_loss(features, re_features, labels, norm, option):
    """Transcription of the authors' re_loss (spec §3) on NCHW tensors."""
    if norm == "l1":
        element_loss = lambda a, b: torch.abs(a - b)  # noqa: E731
    else:
        element_loss = lambda a, b: (a - b) ** 2  # noqa: E731
    if option == "masking":
        class_mask = labels.unsqueeze(2).unsqueeze(3)
        return (element_loss(features, re_features) * class_mask).mean()
    if option == "selection":
        total = 0.0
        for b in range(labels.size(0)):
            class_indices = labels[b].nonzero(as_tuple=True)
            total = total + element_loss(
                features[b][class_indices], re_features[b][class_indices]
            ).mean()
        return total / labels.size(0)
    return element_loss(features, re_features).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multilabel_soft_margin_loss_matches_torch(seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((BATCH, CLASSES)) * 5).astype(np.float32)
    logits[0, 0] = 40.0  # saturated logits must not give log(0)
    logits[1, 1] = -40.0
    labels = (rng.random((BATCH, CLASSES)) < 0.3).astype(np.float32)
    expected = torch.nn.MultiLabelSoftMarginLoss()(
        torch.from_numpy(logits), torch.from_numpy(labels)
    )
    ours = losses.multilabel_soft_margin_loss(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(float(ours), expected.item(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("option", ["masking", "selection", "none"])
def test_reconstruction_loss_value_and_gradients_match_torch(norm, option):
    features, reconstructed, labels = _random_case(seed=3)
    torch_features = _to_nchw_torch(features)
    torch_reconstructed = _to_nchw_torch(reconstructed)
    expected = _torch_re_loss(
        torch_features, torch_reconstructed, torch.from_numpy(labels), norm, option
    )
    expected.backward()

    def loss_fn(a, b):
        return losses.reconstruction_loss(a, b, jnp.asarray(labels), norm=norm, option=option)

    value, (grad_features, grad_reconstructed) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
        jnp.asarray(features), jnp.asarray(reconstructed)
    )
    np.testing.assert_allclose(float(value), expected.item(), rtol=1e-5, atol=1e-6)
    # No stop-gradient: both branches receive the torch gradients.
    np.testing.assert_allclose(
        np.asarray(grad_features), torch_features.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(grad_reconstructed),
        torch_reconstructed.grad.numpy().transpose(0, 2, 3, 1),
        atol=1e-6,
    )


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_selection_with_a_class_free_sample_is_finite(norm):
    features, reconstructed, labels = _random_case(seed=5)
    labels[2] = 0.0
    # The authors' loop gives NaN (mean of an empty selection) ...
    nan_loss = _torch_re_loss(
        torch.from_numpy(features.transpose(0, 3, 1, 2)),
        torch.from_numpy(reconstructed.transpose(0, 3, 1, 2)),
        torch.from_numpy(labels),
        norm,
        "selection",
    )
    assert torch.isnan(nan_loss)
    # ... ours lets that sample contribute 0 while still dividing by the whole batch.
    keep = [0, 1, 3]
    partial = _torch_re_loss(
        torch.from_numpy(features[keep].transpose(0, 3, 1, 2)),
        torch.from_numpy(reconstructed[keep].transpose(0, 3, 1, 2)),
        torch.from_numpy(labels[keep]),
        norm,
        "selection",
    )
    expected = partial.item() * len(keep) / BATCH

    def loss_fn(a):
        return losses.reconstruction_loss(
            a, jnp.asarray(reconstructed), jnp.asarray(labels), norm=norm, option="selection"
        )

    value, gradient = jax.value_and_grad(loss_fn)(jnp.asarray(features))
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(gradient)))
    assert np.all(np.asarray(gradient)[2] == 0)


def test_reconstruction_loss_rejects_unknown_options():
    features, reconstructed, labels = _random_case(seed=0)
    with pytest.raises(ValueError, match="'l3'.*l1, l2"):
        losses.reconstruction_loss(features, reconstructed, labels, norm="l3")
    with pytest.raises(ValueError, match="'mask'.*masking, selection, none"):
        losses.reconstruction_loss(features, reconstructed, labels, option="mask")
    with pytest.raises(ValueError, match="same shape"):
        losses.reconstruction_loss(features, reconstructed[:, :2], labels)


def _torch_make_cam(x, epsilon=1e-5):
    """Transcription of the authors' make_cam (spec §3) on NCHW."""
    x = F.relu(x)
    batch, channels, _, _ = x.size()
    max_value = x.view(batch, channels, -1).max(dim=-1)[0].view(batch, channels, 1, 1)
    return F.relu(x - epsilon) / (max_value + epsilon)


def test_make_cam_matches_torch():
    features, _, _ = _random_case(seed=8)
    features[0, :, :, 3] = -1.0  # an all-negative map must stay 0, not 0/0
    features[1, 0, 0, 4] = 5e-6  # activations below epsilon are zeroed
    expected = _torch_make_cam(torch.from_numpy(features.transpose(0, 3, 1, 2))).numpy()
    ours = np.asarray(losses.make_cam(jnp.asarray(features)))
    np.testing.assert_allclose(ours, expected.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-7)
    assert np.all(ours[0, :, :, 3] == 0)
    assert ours.max() < 1.0


def test_alpha_schedule_at_chosen_steps():
    # README: alpha 4, schedule 0.5, 4950 iterations -> ramp ends at 2475.
    total, alpha, ramp = 4950, 4.0, 0.5
    at = lambda step: float(losses.alpha_at_step(step, total, alpha, ramp))  # noqa: E731
    assert at(0) == 0.0
    np.testing.assert_allclose(at(990), 4.0 * 990 / 2475, rtol=1e-6)
    np.testing.assert_allclose(at(2475), 4.0, rtol=1e-6)
    assert at(2476) == 4.0
    assert at(4949) == 4.0
    # Constant alpha when the schedule is 0.
    assert float(losses.alpha_at_step(0, total, alpha, 0.0)) == 4.0
    assert float(losses.alpha_at_step(3000, total, alpha, 0.0)) == 4.0
    # Traced integer steps under jit.
    jitted = jax.jit(lambda step: losses.alpha_at_step(step, total, alpha, ramp))
    steps = jnp.asarray([0, 495, 2475, 4000], jnp.int32)
    np.testing.assert_allclose(
        np.asarray(jax.vmap(jitted)(steps)), [0.0, 0.8, 4.0, 4.0], rtol=1e-6
    )


def test_parse_loss_option():
    assert losses.parse_loss_option("cl") == (False, False)
    assert losses.parse_loss_option("cl_pcl") == (True, False)
    assert losses.parse_loss_option("cl_re") == (False, True)
    assert losses.parse_loss_option("cl_pcl_re") == (True, True)
    with pytest.raises(ValueError, match="cam.loss_option.*'cl_pcl_re_conf'.*cl, cl_pcl, cl_re"):
        losses.parse_loss_option("cl_pcl_re_conf")


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_cross_entropy_matches_torch_with_ignored_pixels(seed):
    """Value and gradient against torch's CrossEntropyLoss(ignore_index=255), in float64."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (2, 5, 7, 4))
    label_maps = rng.integers(0, 4, (2, 5, 7))
    label_maps[rng.random((2, 5, 7)) < 0.3] = 255
    with jax.enable_x64():
        (loss, count), gradient = jax.value_and_grad(losses.pixel_cross_entropy, has_aux=True)(
            jnp.asarray(logits), jnp.asarray(label_maps)
        )
    reference_logits = torch.tensor(logits.transpose(0, 3, 1, 2), requires_grad=True)
    reference = F.cross_entropy(reference_logits, torch.tensor(label_maps), ignore_index=255)
    reference.backward()
    assert int(count) == int((label_maps != 255).sum())
    np.testing.assert_allclose(float(loss), reference.item(), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gradient), reference_logits.grad.numpy().transpose(0, 2, 3, 1), atol=1e-14)


def test_pixel_cross_entropy_of_a_batch_without_labels_is_zero_not_nan():
    loss, count = losses.pixel_cross_entropy(jnp.ones((1, 3, 3, 2)), jnp.full((1, 3, 3), 255))
    assert float(loss) == 0.0 and int(count) == 0
